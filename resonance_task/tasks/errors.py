"""What a task's run may raise to end it for good (here so registry.py and payload.py
both raise it without importing each other)."""

from __future__ import annotations

from resonance_task.errors import PoisonError


class PermanentError(PoisonError):
    """Raised by a processor: retrying this task cannot help (bad payload, refused).
    Poison to the error policy: the task goes dead at once."""

    def __init__(self, detail: str = "", reason: str = "permanent_error") -> None:
        super().__init__(reason, detail)
