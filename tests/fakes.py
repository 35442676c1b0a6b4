"""In-memory stand-ins for the stores, for unit tests (integration tests use the real ones)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class MemoryMembers:
    """A MemberStore paging in name order by keyset, like the stores; counts pages read.

    Its cursor is the last name read (the real stores' cursors are opaque strings); as
    theirs, it is None once nothing is left after the page.
    """

    def __init__(self, groups: dict[str, list[str]]) -> None:
        self.groups = groups
        self.pages = 0

    async def page(self, session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        self.pages += 1
        ordered = sorted(self.groups.get(session_id, []))
        members = (
            ordered[bisect.bisect_right(ordered, after) :][:count] if after else ordered[:count]
        )
        rest = ordered[bisect.bisect_right(ordered, members[-1]) :] if members else []
        return members, members[-1] if rest else None

    async def count(self, session_id: str) -> int:
        return len(self.groups.get(session_id, []))

    async def add(
        self, session_id: str, users: Sequence[str], joined_at_ms: int | None = None
    ) -> None:
        self.groups.setdefault(session_id, []).extend(users)

    async def remove(self, session_id: str, users: Sequence[str]) -> None:
        self.groups[session_id] = [u for u in self.groups.get(session_id, []) if u not in users]

    async def sessions_of(self, user: str) -> dict[str, int]:
        return {s: 0 for s, users in self.groups.items() if user in users}

    async def close(self) -> None:
        return None
