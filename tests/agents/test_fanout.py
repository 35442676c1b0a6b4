"""Fanout unit tests: recipients, who gets what, one record per partition and gateway."""

from __future__ import annotations

import random

import pytest
from redis.exceptions import ResponseError

from resonance_task.agents.fanout import Diffusion, Fanout
from resonance_task.agents.route import Router
from resonance_task.errors import ATTEMPTS
from resonance_task.pipeline.deliveries import session_partition
from resonance_task.pipeline.dlq import H_REASON, SourceRecord
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.stores.members import UnpageableGroup
from resonance_task.stores.postgres import MemberTableError
from tests.agents.outputs import Sink, router
from tests.fakes import MemoryMembers as Members

PARTITIONS = 8
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make(
    groups: dict[str, list[str]] | None = None, route: Router | None = None, **kw: int
) -> tuple[Fanout, Sink, Members]:
    sink, members = Sink(), Members(groups or {})
    fanout = Fanout(
        members=members,
        router=route or router(),
        outputs=sink.outputs(),
        dead_letters=sink.dead_letters(),
        partitions=PARTITIONS,
        page_size=kw.get("page_size", 100),
        max_users_per_delivery=kw.get("max_users", 5000),
        record_max_bytes=kw.get("max_bytes", 512 * 1024),
        diffusion=Diffusion(kw.get("large", 0), kw.get("read", 0)),
    )
    return fanout, sink, members


def record(event: PushEvent | bytes, offset: int = 0) -> SourceRecord:
    value = event if isinstance(event, bytes) else event.SerializeToString()
    return SourceRecord("push", 0, offset, b"k", value, [("traceparent", TRACEPARENT.encode())])


def chat(msg_id: int, sender: str, to: str, session: str = "s") -> PushEvent:
    return PushEvent(
        msg_id=msg_id, seq_id=msg_id, session_id=session, from_username=sender, to_username=to
    )


async def test_single_chat_stores_both_pushes_the_recipient_routed_by_the_views() -> None:
    fanout, sink, _ = make(route=router({"a": ["g1"], "b": ["g1", "g2"]}, "g1", "g2"))
    acks = await fanout.handle([record(chat(1, "a", "b"))])
    assert sink.stored() == ["a", "b"]
    assert sink.pushed() == {"g1": ["b"], "g2": ["b"]}  # both of b's devices, never the sender
    assert sink.offline == [] and len(acks) == 3
    (delivery,) = sink.delivered()
    assert delivery.message.msg_id == 1
    assert dict(delivery.trace_headers) == {"traceparent": TRACEPARENT}


async def test_a_batch_is_one_deliveries_record_per_partition_and_one_push_record_per_gateway() -> (
    None
):
    route = router({f"u{i}": ["g1"] for i in range(50)}, "g1")
    fanout, sink, _ = make(route=route)
    events = [chat(i, f"u{i % 50}", f"u{(i + 1) % 50}", f"s{i % 7}") for i in range(1, 201)]
    await fanout.handle([record(e, i) for i, e in enumerate(events)])
    partitions = [p for p, _ in sink.deliveries]
    assert len(partitions) == len(set(partitions)) <= PARTITIONS
    for partition, batch in sink.deliveries:
        assert {session_partition(d.message.session_id, PARTITIONS) for d in batch.deliveries} == {
            partition
        }
    ((key, pushes),) = sink.pushes
    assert key == b"g1" and pushes.address == "g1:1"
    # In the batch's order, so each conversation reaches the gateway in order.
    assert [p.message.msg_id for p in pushes.pushes] == list(range(1, 201))


async def test_users_without_a_pushable_gateway_go_offline() -> None:
    route = router(
        {"a": ["old"], "b": ["drain"], "c": ["up"], "d": ["old", "up"]},
        "up",
        silent=("old",),
        draining=("drain",),
    )
    fanout, sink, _ = make({"g": ["a", "b", "c", "d", "e"]}, route=route)
    await fanout.handle(
        [record(PushEvent(session_type=2, msg_id=9, session_id="g", from_username="c"))]
    )
    assert sink.pushed() == {"up": ["d"]}
    assert sink.offline_users() == ["a", "b", "e"]
    assert {o.reason for o in sink.offline} == {"not_online"}


async def test_group_is_paged_and_read_once_per_batch() -> None:
    members = [f"m{i}" for i in range(1000)]
    fanout, sink, store = make({"g": members}, page_size=100)
    events = [
        PushEvent(
            session_type=2, msg_id=i, session_id="g", from_username="m0", exclude_usernames=["m5"]
        )
        for i in (1, 2)
    ]
    await fanout.handle([record(e) for e in events])
    assert sink.stored() == sorted(2 * [m for m in members if m != "m5"])
    assert store.pages == 10  # ten full pages, the last one known to be the last, read once


async def test_big_recipient_lists_are_split_by_count_and_by_bytes() -> None:
    members = [f"m{i:05d}" for i in range(3000)]
    fanout, sink, _ = make({"g": members}, page_size=1000, max_users=100)
    await fanout.handle([record(PushEvent(session_type=2, msg_id=3, session_id="g"))])
    assert all(len(d.users) <= 100 for d in sink.delivered())
    assert sink.stored() == members

    fanout, sink, _ = make({"g": members}, page_size=1000, max_bytes=16 * 1024)
    big = PushEvent(session_type=2, msg_id=4, session_id="g", content="x" * 4000)
    await fanout.handle([record(big)])
    assert sink.stored() == members
    assert all(batch.ByteSize() <= 16 * 1024 for _, batch in sink.deliveries)
    assert len(sink.deliveries) > 1


async def test_explicit_recipients_deduplicated_and_flags_carried() -> None:
    fanout, sink, _ = make(route=router({"b": ["g1"]}, "g1"))
    event = PushEvent(
        msg_id=4,
        session_id="g",
        from_username="a",
        to_usernames=["b", "b", "a", "c"],
        exclude_usernames=["c"],
        persist_only=True,
        priority=1,
    )
    await fanout.handle([record(event)])
    assert sink.stored() == ["a", "b"]
    assert all(d.priority == 1 for d in sink.delivered())
    assert sink.pushes == [] and sink.offline == []  # persist_only: stored, not pushed

    push_only = PushEvent(msg_id=5, session_id="t", from_username="a", to_username="b")
    push_only.push_only = True
    await fanout.handle([record(push_only)])
    assert sink.stored() == ["a", "b"]  # nothing more stored
    assert sink.pushed() == {"g1": ["b"]}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe garbage", "decode_error"),
        (PushEvent(session_id="s").SerializeToString(), "invalid"),
        (PushEvent(msg_id=1).SerializeToString(), "invalid"),
        (PushEvent(msg_id=1, session_id="s", session_type=1).SerializeToString(), "invalid"),
    ],
)
async def test_bad_records_go_to_dead_letters_and_the_rest_of_the_batch_flows(
    value: bytes, reason: str
) -> None:
    fanout, sink, _ = make()
    await fanout.handle([record(value), record(chat(7, "a", "b"), 1)])
    assert sink.stored() == ["a", "b"]
    ((topic, headers),) = sink.dead
    assert topic == "push.dlq"
    assert headers[H_REASON] == reason.encode()


async def test_member_store_errors_are_retried_not_fatal() -> None:
    fanout, sink, members = make({"g": ["a", "b"]})
    real_page = members.page
    failures = [ConnectionError("redis down"), TimeoutError()]

    async def flaky(session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        if failures:
            raise failures.pop(0)
        return await real_page(session_id, after, count)

    members.page = flaky  # type: ignore[method-assign]
    await fanout.handle([record(PushEvent(msg_id=5, session_id="g", session_type=2))])
    assert sink.stored() == ["a", "b"]


async def test_a_group_the_store_cannot_page_is_dead_lettered_not_retried() -> None:
    fanout, sink, members = make({"ok": ["a", "b"]})
    real_page = members.page

    async def refuse(session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        if session_id == "bad":
            raise UnpageableGroup("member_store_wrong_type", "group:{bad}:members is a string")
        return await real_page(session_id, after, count)

    members.page = refuse  # type: ignore[method-assign]
    await fanout.handle(
        [
            record(PushEvent(session_type=2, msg_id=1, session_id="bad")),
            record(PushEvent(session_type=2, msg_id=2, session_id="ok")),
        ]
    )
    assert sink.stored() == ["a", "b"]
    ((_, headers),) = sink.dead
    assert headers[H_REASON] == b"member_store_wrong_type"


async def test_a_member_store_error_that_is_not_transient_dead_letters_only_its_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: 0.0)
    fanout, sink, members = make({"ok": ["a", "b"]})
    real_page = members.page
    calls = 0

    async def broken(session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        nonlocal calls
        if session_id == "bad":
            calls += 1
            raise ResponseError("ERR Error running script: a bad member in the group")
        return await real_page(session_id, after, count)

    members.page = broken  # type: ignore[method-assign]
    await fanout.handle(
        [
            record(PushEvent(session_type=2, msg_id=1, session_id="bad")),
            record(PushEvent(session_type=2, msg_id=2, session_id="ok")),
        ]
    )
    assert sink.stored() == ["a", "b"]  # the stage moves on
    ((_, headers),) = sink.dead
    assert headers[H_REASON] == b"member_store_error"
    assert calls == ATTEMPTS  # a few tries, never for ever


async def test_large_groups_are_handed_over_small_ones_fanned_out() -> None:
    group = [f"m{i:04d}" for i in range(250)]
    fanout, sink, members = make(
        {"big": group, "small": group[:150]}, page_size=1000, large=200, read=240
    )
    await fanout.handle(
        [
            record(
                PushEvent(
                    session_type=2, msg_id=1, session_id="big", trace_headers={"tracestate": "x"}
                )
            ),
            record(PushEvent(session_type=2, msg_id=2, session_id="small")),
        ]
    )
    ((key, job),) = sink.jobs
    assert key == b"big" and job.event.msg_id == 1
    assert job.read_diffusion and job.members == 250
    assert dict(job.trace_headers) == {"traceparent": TRACEPARENT, "tracestate": "x"}
    assert sink.stored() == group[:150]
    # Only the group whose first page was full paid for a count; each read its first page.
    assert members.pages == 2


async def test_a_misconfigured_member_table_makes_events_wait_not_die() -> None:
    fanout, sink, members = make({"g": ["a", "b"]})
    real_page = members.page
    failures = [MemberTableError("member table t_members has no column joined")] * 4

    async def misconfigured(
        session_id: str, after: str, count: int
    ) -> tuple[list[str], str | None]:
        if failures:
            raise failures.pop(0)  # until an operator fixes the table
        return await real_page(session_id, after, count)

    members.page = misconfigured  # type: ignore[method-assign]
    await fanout.handle([record(PushEvent(msg_id=5, session_id="g", session_type=2))])
    assert sink.stored() == ["a", "b"] and sink.dead == []


# Limits: what producers we do not control may send (pipeline/limits.py).


def reasons(sink: Sink) -> list[bytes]:
    return [headers[H_REASON] for _, headers in sink.dead]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (PushEvent(msg_id=1, session_id="s", to_username="b", content="x" * 300_000), "too_large"),
        (PushEvent(msg_id=1, session_id="s", to_username="b", content="é" * 140_000), "too_large"),
        (PushEvent(msg_id=1, session_id="s", to_username="b", session_type=7), "invalid"),
        # No recipients and not said to be a group: a truncated event reaches no group.
        (PushEvent(msg_id=1, session_id="g", from_username="a"), "invalid"),
        (PushEvent(msg_id=1, session_id="s" * 129, to_username="b"), "invalid_id"),
        (PushEvent(msg_id=1, session_id="s\x00", to_username="b"), "invalid_id"),
        (PushEvent(msg_id=1, session_id="{s}", to_username="b"), "invalid_id"),
        (
            PushEvent(msg_id=1, session_id="s", from_username="a\u202e", to_username="b"),
            "invalid_id",
        ),
    ],
)
async def test_events_over_a_limit_are_dead_lettered_with_the_reason(
    event: PushEvent, reason: str
) -> None:
    fanout, sink, _ = make({"g": ["a", "b"]})
    good = PushEvent(msg_id=2, session_id="t", from_username="a", to_username="b")
    await fanout.handle([record(event), record(good, offset=1)])
    assert reasons(sink) == [reason.encode()]
    assert sink.stored() == ["a", "b"]  # the good event around it went through


async def test_a_record_over_record_max_bytes_is_dead_lettered_not_sent() -> None:
    fanout, sink, _ = make(max_bytes=16 * 1024)
    event = PushEvent(msg_id=1, session_id="s", to_username="b", content="x" * 20_000)
    await fanout.handle([record(event)])
    assert reasons(sink) == [b"too_large"] and sink.deliveries == [] and sink.pushes == []


async def test_refused_recipient_ids_cost_only_themselves() -> None:
    fanout, sink, _ = make({"g": ["m1", "m\x002", "m3", "}m4", "m\u202e5", "m" * 200]})
    await fanout.handle(
        [
            record(
                PushEvent(msg_id=1, session_id="s", from_username="a", to_usernames=["b", "c\x00"])
            ),
            record(PushEvent(msg_id=2, session_id="g", from_username="a", session_type=2), 1),
        ]
    )
    assert sink.stored() == ["a", "a", "b", "m1", "m3"]
    assert reasons(sink) == [b"invalid_user_id"] * 2
    letters = [PushEvent.FromString(v or b"") for v in sink.dead_values]
    assert [sorted(e.to_usernames) for e in letters] == [
        ["c\x00"],
        sorted(["m\x002", "}m4", "m\u202e5", "m" * 200]),
    ]
    assert [e.msg_id for e in letters] == [1, 2]


async def test_a_long_recipient_list_is_paged_by_the_large_group_agent() -> None:
    fanout, sink, _ = make()
    listed = [f"u{i}" for i in range(1001)]
    await fanout.handle([record(PushEvent(msg_id=1, session_id="s", to_usernames=listed))])
    ((key, job),) = sink.jobs
    assert key == b"s" and list(job.event.to_usernames) == listed and not job.read_diffusion
    assert sink.deliveries == [] and sink.pushes == []


async def test_trace_headers_are_lower_cased_and_invalid_ones_dropped() -> None:
    fanout, sink, _ = make()
    capitalised = PushEvent(
        msg_id=1,
        session_id="s",
        to_username="b",
        trace_headers={"Traceparent": TRACEPARENT, "TraceState": "k=v", "X-Other": "y"},
    )
    invalid = PushEvent(
        msg_id=2, session_id="s", to_username="b", trace_headers={"traceparent": "not\nvalid"}
    )
    bare = SourceRecord("push", 0, 1, b"k", invalid.SerializeToString(), [])
    await fanout.handle([record(capitalised), bare])
    first, second = sink.delivered()
    assert dict(first.trace_headers) == {"traceparent": TRACEPARENT, "tracestate": "k=v"}
    assert dict(second.trace_headers) == {}
