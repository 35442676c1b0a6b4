"""What a task's run may raise to end it for good (here so registry.py and payload.py
both raise it without importing each other)."""

from __future__ import annotations


class PermanentError(Exception):
    """Raised by a processor: retrying this task cannot help (bad payload, refused)."""
