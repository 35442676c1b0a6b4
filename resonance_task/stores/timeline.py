"""Group timelines: read diffusion, a huge group's message stored once, not once per member.

A timeline is an inbox whose owner is the group session: the same idempotent append
script, cursors 1, 2, 3... per session without gaps, the same cap and trim watermark.
Redis layout: `timeline:{<session_id>}` (sorted set, score = cursor, member = msg_id),
`timeline:{<session_id>}:seq` and `:trim`; bodies in `msg:{<msg_id>}` as for inboxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.inbox import InboxEntry, RedisInboxStore, WriteResult

KEY_PREFIX = "timeline"


class TimelineStore(Protocol):
    async def append(self, messages: Sequence[PushMessage]) -> WriteResult:
        """Append each message to its session's timeline once; idempotent by msg_id."""

    async def read(self, session_id: str, after: int, limit: int) -> list[InboxEntry]: ...

    async def existing(self, session_ids: Iterable[str]) -> set[str]:
        """Which of these sessions have a timeline (are, or were, read-diffusion groups)."""

    async def close(self) -> None: ...


class RedisTimelineStore:
    def __init__(
        self,
        url: str,
        *,
        max_entries: int,
        message_ttl: int,
        timeout: float = 2.0,
        cluster: bool = False,
    ) -> None:
        self._entries = RedisInboxStore(
            url,
            max_entries=max_entries,
            message_ttl=message_ttl,
            timeout=timeout,
            cluster=cluster,
            key_prefix=KEY_PREFIX,
        )

    async def append(self, messages: Sequence[PushMessage]) -> WriteResult:
        return await self._entries.write([(m, (m.session_id,)) for m in messages])

    async def read(self, session_id: str, after: int, limit: int) -> list[InboxEntry]:
        return await self._entries.read(session_id, after, limit)

    async def existing(self, session_ids: Iterable[str]) -> set[str]:
        # A timeline exists once a message got a cursor in it.
        cursors = await self._entries.last_cursors(list(session_ids))
        return {session_id for session_id, last in cursors.items() if last > 0}

    async def close(self) -> None:
        await self._entries.close()
