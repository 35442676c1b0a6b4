"""A LargeGroups with fakes around it: members in memory, a timeline, cursors in a dict."""

from __future__ import annotations

from collections.abc import Sequence

from resonance_task.agents.large_group import Cursor, LargeGroups
from resonance_task.pipeline.dlq import SourceRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import LargeGroupJob
from resonance_task.stores.inbox import InboxEntry, WriteResult
from tests.agents.outputs import Sink, router
from tests.fakes import MemoryMembers

PARTITIONS = 4


GROUP = [f"m{i:04d}" for i in range(250)]


class Timeline:
    def __init__(self) -> None:
        self.appended: list[int] = []

    async def append(self, messages: Sequence[PushMessage]) -> WriteResult:
        self.appended += [m.msg_id for m in messages]
        return WriteResult(new=len(messages), duplicate=0)

    async def read(self, session_id: str, after: int, limit: int) -> list[InboxEntry]:
        return []

    async def existing(self, session_ids: object) -> set[str]:
        return set()

    async def close(self) -> None:
        return None


class Harness:
    def __init__(self, members: list[str], **kw: float) -> None:
        self.members = MemoryMembers({"big": list(members)})
        self.timeline = Timeline()
        self.cursors: dict[str, Cursor] = {}
        self.sink = Sink()
        self.saves: list[int] = []  # pages finished, at each cursor save
        online = {u: ["g1"] for u in members[::2]}  # every other member online
        self.groups = LargeGroups(
            members=self.members,
            timeline=self.timeline,
            cursors=self.cursors,
            save=self.save,
            router=router(online, "g1"),
            outputs=self.sink.outputs(),
            dead_letters=self.sink.dead_letters(),
            partitions=PARTITIONS,
            page_size=int(kw.get("page_size", 100)),
            max_users_per_delivery=int(kw.get("max_users", 5000)),
            pages_in_flight=int(kw.get("window", 1)),
        )

    async def save(self, key: str, cursor: Cursor) -> None:
        self.cursors[key] = cursor
        self.saves.append(cursor["pages"])

    async def run(self, job: LargeGroupJob) -> int:
        return await self.groups.handle(SourceRecord("jobs", 2, 7, b"big", job.SerializeToString()))

    def users(self) -> list[str]:
        return [u for d in self.sink.delivered() for u in d.users]

    def pages(self) -> set[int]:
        return {d.page for d in self.sink.delivered()}

    @property
    def dead(self) -> list[str]:
        return [headers["dlq.reason"].decode() for _, headers in self.sink.dead]


def job(read: bool = False, **fields: object) -> LargeGroupJob:
    event = PushEvent(msg_id=99, seq_id=3, session_id="big", session_type=2, **fields)  # type: ignore[arg-type]
    return LargeGroupJob(event=event, read_diffusion=read, members=len(GROUP))
