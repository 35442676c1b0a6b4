"""What we accept from producers we do not control: sizes and identifiers.

An id (user, session) is at most `id_max_bytes` of UTF-8 and holds no control or
invisible formatting characters (NUL, a right-to-left override, zero-width joiners,
line separators) and no `{` or `}`: Redis keys put ids inside a `{...}` hash tag, where
a brace would split one user's keys across cluster slots (CROSSSLOT) or make an inbox
unreadable through the API. An id is refused, never rewritten: a rewritten id would be
somebody else's.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_BRACES = frozenset("{}")


@dataclass(frozen=True)
class Limits:
    content_max_bytes: int = 256 * 1024
    # Explicit recipients (to_usernames) fanned out inline; a longer list is paged by
    # the large_group agent, like a large group's members.
    recipients_max: int = 1000
    id_max_bytes: int = 128

    def id_problem(self, value: str) -> str | None:
        """Why `value` is not an acceptable id, or None if it is."""
        if not value:
            return "empty"
        if value.isascii():
            # Most ids: one C-speed pass (printable ASCII has no control characters).
            if len(value) > self.id_max_bytes:
                return f"longer than {self.id_max_bytes} bytes"
            if not value.isprintable():
                return "control character"
            if "{" in value or "}" in value:
                return "brace"
            return None
        if len(value.encode()) > self.id_max_bytes:
            return f"longer than {self.id_max_bytes} bytes"
        for char in value:
            if char in _BRACES:
                return "brace"
            if unicodedata.category(char) in _REFUSED_CATEGORIES:
                return f"character U+{ord(char):04X} ({unicodedata.category(char)})"
        return None

    def split_ids(self, ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """(acceptable, refused), each in the given order."""
        good: list[str] = []
        bad: list[str] = []
        for value in ids:
            (bad if self.id_problem(value) else good).append(value)
        return good, bad
