"""Fuzz every input topic's stage with malformed records (hypothesis).

Random bytes, valid records cut short or with bits flipped, records of another topic's
type, oversized content, unknown enum values and hostile ids. The property is the same
for every stage: each record is either used or dead-lettered with a reason, nothing
raises, and a good record handled in the same batch still gets through. About 10,000
records in all (EXAMPLES per stage).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiokafka.structs import ConsumerRecord
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resonance_task.agents.fanout import Diffusion, Fanout, recipients
from resonance_task.agents.presence import decode_sync
from resonance_task.agents.storage import StorageConsumer
from resonance_task.offline import records as offline_records
from resonance_task.pipeline.dlq import H_REASON, DeadLetters, SourceRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat, PushMessage
from resonance_task.proto.resonance.logic.v1.presence_pb2 import SyncStatusRequest, UserOnline
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import (
    Delivery,
    DeliveryBatch,
    GatewayPushBatch,
    LargeGroupJob,
)
from resonance_task.stage import StageOptions
from resonance_task.stores.inbox import WriteResult
from resonance_task.tables.gateways import decode_heartbeat
from tests.agents.large_groups import Harness
from tests.agents.outputs import Sink, router
from tests.fakes import MemoryMembers

GROUPS = {"ok-user": ["m1", "m2"], "g": ["m1"]}
EXAMPLES = 1700  # x 6 stages
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
ids = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "a\x00b", "rtl\u202eevil", "{x}", "}x", "x" * 300, "ok-user"]),
)


def _mangle(valid: bytes, data: st.DataObject) -> bytes:
    how = data.draw(st.sampled_from(["cut", "flip", "as_is", "append"]))
    if how == "cut" and valid:
        return valid[: data.draw(st.integers(0, len(valid) - 1))]
    if how == "flip" and valid:
        at = data.draw(st.integers(0, len(valid) - 1))
        return valid[:at] + bytes([valid[at] ^ data.draw(st.integers(1, 255))]) + valid[at + 1 :]
    if how == "append":
        return valid + data.draw(st.binary(min_size=1, max_size=50))
    return valid


def malformed(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes a producer we do not control might send where `valid` messages belong."""
    other_types = st.sampled_from(
        [
            DeliveryBatch(deliveries=[Delivery(users=["u"])]).SerializeToString(),
            GatewayHeartbeat(gateway_id="g", address="h:1").SerializeToString(),
            GatewayPushBatch(gateway_id="g").SerializeToString(),
            b'{"json": "not protobuf"}',
        ]
    )

    @st.composite
    def mangled(draw: st.DrawFn) -> bytes:
        return _mangle(draw(valid).SerializeToString(), draw(st.data()))

    return st.one_of(st.binary(max_size=300), other_types, mangled())


push_events = st.builds(
    PushEvent,
    msg_id=st.integers(-5, 2**63 - 1),
    seq_id=st.integers(0, 2**40),
    session_id=ids,
    from_username=ids,
    to_username=ids,
    to_usernames=st.lists(ids, max_size=5),
    exclude_usernames=st.lists(ids, max_size=2),
    session_type=st.integers(-3, 5),
    content=st.one_of(st.text(max_size=30), st.just("x" * 300_000)),
    trace_headers=st.dictionaries(
        st.sampled_from(["traceparent", "Traceparent", "TRACESTATE", "x"]), st.text(max_size=60)
    ),
    persist_only=st.booleans(),
    push_only=st.booleans(),
)


def consumer_record(value: bytes, offset: int) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord("t", 0, offset, 0, 0, b"k", value, None, 0, len(value), ())


def source(value: bytes, offset: int = 0) -> SourceRecord:
    return SourceRecord("t", 0, offset, b"k", value, [])


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


@FUZZ
@given(st.lists(malformed(push_events), min_size=1, max_size=4))
def test_push_events(values: Sequence[bytes]) -> None:
    sink = Sink()
    fanout = Fanout(
        members=MemoryMembers(GROUPS),
        router=router({"m1": ["gw"], "good-b": ["gw"]}, "gw"),
        outputs=sink.outputs(),
        dead_letters=sink.dead_letters(),
        partitions=4,
        page_size=100,
        max_users_per_delivery=5000,
        diffusion=Diffusion(50, 0),
    )
    good = PushEvent(msg_id=7, session_id="s", from_username="good-a", to_username="good-b")
    records = [source(v, i) for i, v in enumerate(values)]
    run(fanout.handle([*records, source(good.SerializeToString(), len(values))]))
    assert all(headers[H_REASON] for _, headers in sink.dead)
    fanned = {d.message.msg_id for d in sink.delivered()}
    fanned |= {p.message.msg_id for _, b in sink.pushes for p in b.pushes}
    fanned |= {job.event.msg_id for _, job in sink.jobs}
    fanned |= {o.message.msg_id for o in sink.offline}
    assert 7 in fanned and "good-b" in sink.stored()  # the good record got through
    dead = {v for v in sink.dead_values}
    # A refused recipient's letter is the event re-addressed to them: known by its msg_id.
    dead_ids = {_event_msg_id(v or b"") for v in sink.dead_values}
    for value in values:
        msg_id = _event_msg_id(value)
        used = msg_id in fanned
        assert used or value in dead or msg_id in dead_ids or _addressed_to_nobody(value), value


def _addressed_to_nobody(value: bytes) -> bool:
    """A valid event with nobody to store for or push to: there is nothing to do."""
    event = PushEvent.FromString(value)
    chosen = recipients(event, GROUPS.get(event.session_id, ()))
    # Pushes leave the sender out: a push-only message to oneself reaches no one.
    return not chosen or (event.push_only and chosen == [event.from_username])


def _event_msg_id(value: bytes) -> int | None:
    try:
        return PushEvent.FromString(value).msg_id
    except Exception:
        return None


class Inbox:
    def __init__(self) -> None:
        self.pairs: set[tuple[int, str]] = set()

    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        new = {(m.msg_id, u) for m, users in batch for u in users} - self.pairs
        self.pairs |= new
        return WriteResult(new=len(new), duplicate=0)


deliveries = st.builds(
    DeliveryBatch,
    deliveries=st.lists(
        st.fixed_dictionaries(
            {"message": st.builds(PushMessage, msg_id=st.integers(1, 99)), "users": st.lists(ids)}
        ),
        max_size=3,
    ),
)


@FUZZ
@given(st.lists(malformed(deliveries), min_size=1, max_size=4))
def test_deliveries(values: Sequence[bytes]) -> None:
    sink, inbox = Sink(), Inbox()
    storage = StorageConsumer(
        StageOptions(topics=("t",), consumer_config={}, batch_max_records=10),
        dead_letters=sink.dead_letters(),
        inbox=inbox,  # type: ignore[arg-type]
        retry_max_seconds=0.01,
    )
    good = DeliveryBatch(deliveries=[Delivery(message=PushMessage(msg_id=1000), users=["good"])])
    records = [consumer_record(v, i) for i, v in enumerate([*values, good.SerializeToString()])]
    run(storage.handle(records))
    assert (1000, "good") in inbox.pairs
    for value in values:
        try:
            batch = DeliveryBatch.FromString(value)
        except Exception:
            assert value in sink.dead_values
            continue
        for d in batch.deliveries:
            if not d.push_only:
                assert all((d.message.msg_id, u) in inbox.pairs for u in d.users)


presence = st.builds(
    SyncStatusRequest,
    gateway_id=ids,
    online_batch=st.lists(
        st.builds(UserOnline, username=ids, timestamp=st.integers(-(2**62), 2**62)), max_size=3
    ),
)


@FUZZ
@given(malformed(presence))
def test_presence(value: bytes) -> None:
    sink = Sink()
    dead = sink.dead_letters()
    now = int(time.time() * 1000)
    changes = run(dead.decoded(source(value), lambda v: decode_sync(v, record_ts_ms=now)))
    if changes is None:
        assert sink.dead and sink.dead[0][1][H_REASON]
    else:
        assert all(c.username and c.timestamp <= now + 60_000 for c in changes)


heartbeats = st.builds(
    GatewayHeartbeat, gateway_id=ids, address=ids, timestamp=st.integers(-(2**62), 2**62)
)


@FUZZ
@given(malformed(heartbeats))
def test_heartbeats(value: bytes) -> None:
    sink = Sink()
    heartbeat = run(sink.dead_letters().decoded(source(value), decode_heartbeat))
    assert (heartbeat is None) == bool(sink.dead)
    if heartbeat is not None:
        assert heartbeat.gateway_id and heartbeat.address


offline = st.builds(
    GatewayPushBatch, gateway_id=ids
)  # any message type serves: what matters is what the offline decoder makes of bytes


@FUZZ
@given(malformed(offline))
def test_offline_pushes(value: bytes) -> None:
    sink = Sink()
    pushes = run(sink.dead_letters().decoded(source(value), offline_records.decode))
    assert (pushes is None) == bool(sink.dead)


@FUZZ
@given(malformed(push_events))
def test_large_group_jobs(value: bytes) -> None:
    h = Harness([f"m{i}" for i in range(30)], page_size=10)
    try:
        event = PushEvent.FromString(value)
        job_value = LargeGroupJob(event=event).SerializeToString()
    except Exception:
        job_value = value
    run(h.groups.handle(SourceRecord("jobs", 0, 0, b"k", job_value)))
    cursor = h.cursors.get(str(_event_msg_id(value)))
    done = cursor is not None and cursor["done"]
    assert done or h.dead, (value[:60], h.dead)


def test_dead_letters_keep_the_reason_header() -> None:
    sent: list[dict[str, bytes]] = []

    async def send(topic: str, key: Any, value: Any, headers: list[tuple[str, bytes]]) -> None:
        sent.append(dict(headers))

    assert run(DeadLetters(send).decoded(source(b"\xff"), PushEvent.FromString)) is None
    assert sent[0][H_REASON] == b"decode_error"
