"""Fanout unit tests: recipients, who gets what, one record per partition (no broker)."""

from __future__ import annotations

import pytest

from agents.fanout import Fanout
from pipeline.dlq import H_REASON, DeadLetters, SourceRecord
from pipeline.partitioning import partition_for
from proto.resonance.mq.v1.push_event_pb2 import PushEvent
from proto.resonance.pipeline.v1.pipeline_pb2 import Delivery
from tests.fakes import MemoryMembers as Members

PARTITIONS = 8


class Sink:
    def __init__(self) -> None:
        self.records: list[tuple[int, Delivery]] = []
        self.dead: list[tuple[str, list[tuple[str, bytes]]]] = []

    async def send(self, partition: int, key: bytes, value: bytes) -> None:
        self.records.append((partition, Delivery.FromString(value)))

    async def send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        self.dead.append((topic, headers))


def make(groups: dict[str, list[str]] | None = None, **kw: int) -> tuple[Fanout, Sink, Members]:
    sink, members = Sink(), Members(groups or {})
    fanout = Fanout(
        members=members,
        send=sink.send,
        dead_letters=DeadLetters(sink.send_raw),
        partitions=PARTITIONS,
        page_size=kw.get("page_size", 100),
        max_users_per_delivery=kw.get("max_users", 5000),
    )
    return fanout, sink, members


def record(event: PushEvent | bytes) -> SourceRecord:
    value = event if isinstance(event, bytes) else event.SerializeToString()
    return SourceRecord("push", 0, 0, b"k", value)


def users_of(sink: Sink) -> list[str]:
    return sorted(u for _, d in sink.records for u in d.users)


async def test_single_chat_reaches_recipient_and_senders_inbox() -> None:
    fanout, sink, _ = make()
    event = PushEvent(msg_id=1, session_id="s", from_username="a", to_username="b", session_type=1)
    await fanout.handle(record(event))
    assert users_of(sink) == ["a", "b"]
    for partition, delivery in sink.records:
        assert all(partition_for(u, PARTITIONS) == partition for u in delivery.users)
        assert delivery.message.msg_id == 1


async def test_group_one_record_per_partition_and_paged() -> None:
    members = [f"m{i}" for i in range(1000)]
    fanout, sink, store = make({"g": members}, page_size=100)
    event = PushEvent(
        msg_id=2, session_id="g", from_username="m0", session_type=2, exclude_usernames=["m5"]
    )
    await fanout.handle(record(event))
    partitions = [p for p, _ in sink.records]
    assert len(partitions) == len(set(partitions)) <= PARTITIONS
    assert users_of(sink) == sorted(set(members) - {"m5"})
    assert store.pages == 11  # ten full pages and the empty one that ends it


async def test_big_partitions_are_split_but_bounded() -> None:
    members = [f"m{i}" for i in range(3000)]
    fanout, sink, _ = make({"g": members}, max_users=100)
    await fanout.handle(record(PushEvent(msg_id=3, session_id="g", session_type=2)))
    assert all(len(d.users) <= 100 for _, d in sink.records)
    assert users_of(sink) == sorted(members)


async def test_explicit_recipients_deduplicated_and_flags_carried() -> None:
    fanout, sink, _ = make()
    event = PushEvent(
        msg_id=4,
        session_id="g",
        from_username="a",
        to_usernames=["b", "b", "a", "c"],
        exclude_usernames=["c"],
        persist_only=True,
        priority=1,
    )
    await fanout.handle(record(event))
    assert users_of(sink) == ["a", "b"]
    assert all(d.persist_only and d.priority == 1 for _, d in sink.records)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe garbage", "decode_error"),
        (PushEvent(session_id="s").SerializeToString(), "invalid"),
        (PushEvent(msg_id=1).SerializeToString(), "invalid"),
        (PushEvent(msg_id=1, session_id="s", session_type=1).SerializeToString(), "invalid"),
    ],
)
async def test_bad_records_go_to_dead_letters(value: bytes, reason: str) -> None:
    fanout, sink, _ = make()
    assert await fanout.handle(record(value)) == 0
    assert sink.records == []
    ((topic, headers),) = sink.dead
    assert topic == "push.dlq"
    assert dict(headers)[H_REASON] == reason.encode()


async def test_member_store_errors_are_retried_not_fatal() -> None:
    fanout, sink, members = make({"g": ["a", "b"]})
    real_page = members.page
    failures = [ConnectionError("redis down"), TimeoutError()]

    async def flaky(session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        if failures:
            raise failures.pop(0)
        return await real_page(session_id, after, count)

    members.page = flaky  # type: ignore[method-assign]
    await fanout.handle(record(PushEvent(msg_id=5, session_id="g", session_type=2)))
    assert users_of(sink) == ["a", "b"]
