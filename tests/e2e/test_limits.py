"""Sizes, ids and trace headers from producers we do not control, on a real worker.

Each case was a loss or a stall before: a ~1 MB event crashed fanout past its offset
(no inbox entry, no push, no dead letter); 60 messages of 100 KB to one gateway made a
record over the producer's limit (48 of them lost); a capitalised `Traceparent` failed
every push of a batch to a unary-only gateway into offline push.
"""

from __future__ import annotations

from collections import Counter

from resonance_task.commands.traffic import single_chat
from resonance_task.pipeline.dlq import H_REASON
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from tests.harness import Pipeline, eventually

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_oversized_bad_ids_and_capitalised_trace_headers(pipeline: Pipeline) -> None:
    p = pipeline
    worker = await p.start_worker()
    users = [p.user(i) for i in range(10)]
    sim = await p.gateway("gw-legacy", users, stream=False)  # unary Push only
    await p.wait_online(worker, users)

    huge = single_chat(users[0], users[1], 1, "x" * 1_000_000)  # under Kafka's 1 MiB
    big = [single_chat(users[0], users[1 + i % 9], 2 + i, "y" * 100_000) for i in range(60)]
    traced = []
    for i in range(20):
        event = single_chat(users[2], users[3 + i % 7], 100 + i, f"traced {i}")
        event.trace_headers["Traceparent"] = TRACEPARENT
        event.trace_headers["TraceState"] = "vendor=1"
        traced.append(event)
    mixed = single_chat(users[4], users[5], 200, "to one good, one bad id")
    mixed.to_username = ""
    mixed.to_usernames.extend([users[5], "evil\x00id"])
    await p.publish([huge, *big, *traced, mixed])

    pushed = [*big, *traced, mixed]
    await eventually(lambda: _true(len(sim.recorder.deliveries) >= len(pushed)), 60, "every push")
    await p.settled()  # nothing more is on its way: a duplicate would be here
    assert Counter(r.msg_id for r in sim.recorder.deliveries) == Counter(e.msg_id for e in pushed)
    assert await p.offline() == []  # none failed by its gateway

    for event in [*big, *traced]:
        to = event.to_username
        assert event.msg_id in {e.msg_id for e in await p.inbox(to)}, to
    assert [e.msg_id for e in await p.inbox(users[5]) if e.msg_id == mixed.msg_id]
    assert not [e for e in await p.inbox(users[1]) if e.msg_id == huge.msg_id]

    async def dead_letters() -> list[bytes]:
        dead = await p.read_topic(p.topic("TOPIC_PUSH_EVENTS") + ".dlq")
        return sorted(dict(r.headers)[H_REASON] for r in dead)

    async def both_dead() -> bool:
        return len(await dead_letters()) >= 2

    await eventually(both_dead, 30, "two dead letters")
    assert await dead_letters() == [b"invalid_user_id", b"too_large"]
    dead = await p.read_topic(p.topic("TOPIC_PUSH_EVENTS") + ".dlq")
    refused = [r for r in dead if dict(r.headers)[H_REASON] == b"invalid_user_id"]
    assert list(PushEvent.FromString(refused[0].value).to_usernames) == ["evil\x00id"]


async def _true(value: bool) -> bool:
    return value
