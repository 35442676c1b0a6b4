"""large_group unit tests: paging, cursor saves and resume, read diffusion (no broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from agents.fanout import Diffusion, Fanout
from agents.large_group import Cursor, LargeGroups
from pipeline.dlq import DeadLetters, SourceRecord
from pipeline.partitioning import partition_for
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from proto.resonance.mq.v1.push_event_pb2 import PushEvent
from proto.resonance.pipeline.v1.pipeline_pb2 import Delivery, LargeGroupJob
from stores.inbox import InboxEntry, WriteResult
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
        self.sent: list[tuple[int, Delivery]] = []
        self.saves: list[int] = []  # pages finished, at each cursor save
        self.dead: list[str] = []
        self.groups = LargeGroups(
            members=self.members,
            timeline=self.timeline,
            cursors=self.cursors,
            save=self.save,
            send=self.send,
            dead_letters=DeadLetters(self.send_raw),
            partitions=PARTITIONS,
            page_size=int(kw.get("page_size", 100)),
            max_users_per_delivery=int(kw.get("max_users", 5000)),
            pages_in_flight=int(kw.get("window", 1)),
        )

    async def send(self, partition: int, key: bytes, value: bytes) -> asyncio.Future[None]:
        self.sent.append((partition, Delivery.FromString(value)))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def save(self, key: str, cursor: Cursor) -> None:
        self.cursors[key] = cursor
        self.saves.append(cursor["pages"])

    async def send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        self.dead.append(dict(headers)["dlq.reason"].decode())

    async def run(self, job: LargeGroupJob) -> int:
        return await self.groups.handle(SourceRecord("jobs", 2, 7, b"big", job.SerializeToString()))

    def users(self) -> list[str]:
        return [u for _, d in self.sent for u in d.users]


def job(read: bool = False, **fields: object) -> LargeGroupJob:
    event = PushEvent(msg_id=99, seq_id=3, session_id="big", session_type=2, **fields)  # type: ignore[arg-type]
    return LargeGroupJob(event=event, read_diffusion=read, members=len(GROUP))


async def test_pages_every_member_once_and_saves_the_cursor_per_page() -> None:
    h = Harness(GROUP)
    assert await h.run(job(from_username="admin")) == 3
    assert sorted(h.users()) == sorted([*GROUP, "admin"])  # the sender's inbox too, once
    assert h.saves == [1, 2, 3]
    assert h.cursors["99"]["done"] and h.cursors["99"]["partition"] == 2
    for partition, delivery in h.sent:
        assert {partition_for(u, PARTITIONS) for u in delivery.users} == {partition}
        assert delivery.message.msg_id == 99 and not delivery.push_only
    assert sorted({d.page for _, d in h.sent}) == [0, 1, 2]
    # A finished job replayed (its offset commit was lost) does nothing.
    h.sent.clear()
    assert await h.run(job()) == 0 and h.sent == []


async def test_a_window_of_pages_runs_ahead_of_the_saved_cursor() -> None:
    h = Harness(GROUP, page_size=50, window=3)
    sent_at_save: list[int] = []
    save = h.save

    async def recording_save(key: str, cursor: Cursor) -> None:
        sent_at_save.append(len({d.page for _, d in h.sent}))
        await save(key, cursor)

    h.groups._save_cursor = recording_save
    assert await h.run(job()) == 5
    assert h.saves == [1, 2, 3, 4, 5] and h.cursors["99"]["done"]
    # Page k's cursor is saved while pages k+1.. are already out, never more than 3 ahead.
    assert [sent - saved for sent, saved in zip(sent_at_save, h.saves, strict=True)] == [
        2,
        2,
        2,
        1,
        0,
    ]
    assert sorted(h.users()) == GROUP


async def test_resumes_after_the_last_finished_page() -> None:
    h = Harness(GROUP)
    h.cursors["99"] = Cursor(after="m0099", pages=1, done=False, at=0, partition=2)
    assert await h.run(job(from_username="m0007")) == 2
    assert sorted(h.users()) == GROUP[100:]  # neither page 0 nor the sender again
    assert {d.page for _, d in h.sent} == {1, 2}


async def test_excluded_members_and_record_size_bound() -> None:
    h = Harness(GROUP, page_size=250, max_users=10)
    await h.run(job(exclude_usernames=["m0001", "m0002"]))
    assert sorted(h.users()) == [u for u in GROUP if u not in ("m0001", "m0002")]
    assert max(len(d.users) for _, d in h.sent) == 10


async def test_read_diffusion_writes_the_timeline_once_and_pushes_online_only() -> None:
    h = Harness(GROUP)
    await h.run(job(read=True, from_username="m0007"))
    assert h.timeline.appended == [99]
    assert sorted(h.users()) == GROUP  # no extra inbox copy for the sender
    assert all(d.push_only and d.online_only for _, d in h.sent)

    persist_only = Harness(GROUP)
    await persist_only.run(
        LargeGroupJob(
            event=PushEvent(msg_id=5, session_id="big", session_type=2, persist_only=True),
            read_diffusion=True,
        )
    )
    assert persist_only.timeline.appended == [5] and persist_only.sent == []


async def test_undecodable_job_is_dead_lettered() -> None:
    h = Harness(GROUP)
    await h.groups.handle(SourceRecord("jobs", 0, 1, None, b"\xff\xff"))
    assert h.dead == ["decode_error"] and h.sent == []


async def test_fanout_hands_large_groups_over_and_keeps_small_ones() -> None:
    members = MemoryMembers({"big": GROUP, "small": GROUP[:150]})
    jobs: list[tuple[bytes, LargeGroupJob]] = []
    inline: list[Delivery] = []

    async def send(partition: int, key: bytes, value: bytes) -> None:
        inline.append(Delivery.FromString(value))

    async def send_job(key: bytes, value: bytes) -> None:
        jobs.append((key, LargeGroupJob.FromString(value)))

    async def dead(*_: object) -> None:
        raise AssertionError("nothing is dead-lettered")

    fanout = Fanout(
        members=members,
        send=send,
        dead_letters=DeadLetters(dead),
        partitions=PARTITIONS,
        page_size=1000,
        max_users_per_delivery=5000,
        diffusion=Diffusion(large_min_members=200, read_min_members=240),
        send_job=send_job,
    )
    for msg_id, session in ((1, "big"), (2, "small")):
        event = PushEvent(msg_id=msg_id, session_id=session, session_type=2)
        await fanout.handle(SourceRecord("push", 0, msg_id, None, event.SerializeToString()))
    ((key, handed),) = jobs
    assert key == b"big" and handed.event.msg_id == 1
    assert handed.read_diffusion and handed.members == 250
    assert sorted(u for d in inline for u in d.users) == GROUP[:150]
    # Only the group whose first page was full paid for a count.
    assert members.pages == 2
