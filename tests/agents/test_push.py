"""push: a record's offset waits on every push it carried (no broker, no gateway)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from resonance_task.agents.push import Offered, OfflineSink, PushConsumer
from resonance_task.gateway.client import (
    GatewayPool,
    PushItem,
    PushOutcome,
    SessionConfig,
    position,
)
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import GatewayPushBatch
from resonance_task.stage import StageOptions
from tests.agents.outputs import Sink


class Refusing:
    """A gateway session that fails every push at once: its users go to offline push."""

    def offer(self, item: PushItem) -> bool:
        outcome = PushOutcome(delivered=[], failed=item.users, reason="gateway_rejected")
        # Answered in a later loop turn, as a gateway's ack is.
        asyncio.get_running_loop().call_soon(item.on_done, outcome)
        return True


class Pool(GatewayPool):
    def session(self, gateway_id: str, address: str) -> Refusing:  # type: ignore[override]
        return Refusing()


def record(offset: int) -> ConsumerRecord[bytes, bytes]:
    batch = GatewayPushBatch(gateway_id="gw", address="gw:1")
    push = batch.pushes.add()
    push.message.CopyFrom(PushMessage(msg_id=offset + 1, session_id="s"))
    push.users.extend(["u1", "u2"])
    value = batch.SerializeToString()
    return ConsumerRecord("pushes", 0, offset, 0, 0, b"gw", value, None, 2, len(value), ())


def consumer(offline: OfflineSink) -> PushConsumer:
    return PushConsumer(
        options=StageOptions(topics=("pushes",), consumer_config={}, batch_max_records=10),
        pool=Pool(SessionConfig()),
        offline=offline,
        dead_letters=Sink().dead_letters(),
    )


async def test_a_record_is_done_once_its_users_are_handed_to_offline_push() -> None:
    sink = Sink()
    effects = await consumer(OfflineSink(sink.outputs().offline_pushes)).handle_each([record(0)])
    (effect,) = effects
    assert effect is not None
    await asyncio.wait_for(effect, 5)
    assert sink.offline_users() == ["u1", "u2"]


async def test_a_record_whose_offline_handover_failed_does_not_count_as_done() -> None:
    async def broker_refuses(key: bytes | None, value: bytes, p: int | None) -> Awaitable[object]:
        raise ConnectionError("producer closed")

    (effect,) = await consumer(OfflineSink(broker_refuses)).handle_each([record(0)])
    assert effect is not None
    # Failing, not pending for ever: the stage restarts from the committed offset at once.
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(effect, 5)


class Accepting:
    """A gateway session that takes every push and acknowledges it at once."""

    def __init__(self) -> None:
        self.users: list[tuple[int, str]] = []
        self.positions: list[tuple[str, int] | None] = []

    def offer(self, item: PushItem) -> bool:
        self.users += [(item.message.msg_id, u) for u in item.users]
        self.positions.append(item.position)
        outcome = PushOutcome(delivered=item.users, failed=[], reason="")
        # Answered in a later loop turn, as a gateway's ack is.
        asyncio.get_running_loop().call_soon(item.on_done, outcome)
        return True


def push_record(offset: int, pushes: dict[int, list[str]], partition: int = 0) -> ConsumerRecord:
    batch = GatewayPushBatch(gateway_id="gw", address="gw:1")
    for msg_id, users in pushes.items():
        push = batch.pushes.add()
        push.message.CopyFrom(PushMessage(msg_id=msg_id, session_id="s"))
        push.users.extend(users)
    value = batch.SerializeToString()
    return ConsumerRecord("pushes", partition, offset, 0, 0, b"gw", value, None, 2, len(value), ())


def deduping(session: Accepting, dedupe_records: int = 8) -> PushConsumer:
    class One(GatewayPool):
        def session(self, gateway_id: str, address: str) -> Accepting:  # type: ignore[override]
            return session

    return PushConsumer(
        options=StageOptions(topics=("pushes",), consumer_config={}, batch_max_records=10),
        pool=One(SessionConfig()),
        offline=OfflineSink(Sink().outputs().offline_pushes),
        dead_letters=Sink().dead_letters(),
        dedupe_records=dedupe_records,
    )


async def test_a_push_written_again_by_a_redone_fanout_reaches_only_users_not_offered() -> None:
    gateway = Accepting()
    stage = deduping(gateway)
    first = await stage.handle_each([push_record(0, {1: ["a", "b"], 2: ["c"]})])
    # The redone fanout's copy: message 1 now also for "d" (it came online meanwhile).
    again = await stage.handle_each([push_record(1, {1: ["a", "b", "d"], 2: ["c"], 3: ["e"]})])
    await asyncio.gather(*(e for e in first + again if e is not None))
    assert gateway.users == [(1, "a"), (1, "b"), (2, "c"), (1, "d"), (3, "e")]


async def test_a_partition_taken_over_counts_the_replayed_records_as_offered() -> None:
    gateway = Accepting()
    stage = deduping(gateway)
    stage.replayed(TopicPartition("pushes", 0), [push_record(5, {1: ["a"], 2: ["b"]})])
    (effect,) = await stage.handle_each([push_record(6, {1: ["a"], 2: ["b", "c"]})])
    assert effect is not None
    await effect
    assert gateway.users == [(2, "c")]
    # Another partition's memory is its own.
    (effect,) = await stage.handle_each([push_record(0, {1: ["a"]}, partition=1)])
    assert effect is not None
    await effect
    assert gateway.users == [(2, "c"), (1, "a")]


async def test_what_was_offered_before_a_restart_or_a_revoke_is_offered_again() -> None:
    # Offered is not settled: whoever resumes the partition (this worker after a restart)
    # redoes it from the committed offset, and must send it.
    gateway = Accepting()
    stage = deduping(gateway)
    await asyncio.gather(*filter(None, await stage.handle_each([push_record(0, {1: ["a"]})])))
    stage.released({TopicPartition("pushes", 0)})
    await asyncio.gather(*filter(None, await stage.handle_each([push_record(0, {1: ["a"]})])))
    assert gateway.users == [(1, "a"), (1, "a")]


async def test_a_push_keeps_its_position_in_the_record_as_read_when_others_are_dropped() -> None:
    # A gateway answers a stream's opening with the positions it has: a record read again
    # must give each push the position it had the first time, whatever was stripped.
    gateway = Accepting()
    stage = deduping(gateway)
    stage.replayed(TopicPartition("pushes", 0), [push_record(5, {1: ["a"]})])
    (effect,) = await stage.handle_each([push_record(6, {1: ["a"], 2: ["b"], 3: ["c"]})])
    assert effect is not None
    await effect
    assert gateway.users == [(2, "b"), (3, "c")]
    assert gateway.positions == [("pushes/0", position(6, 1)), ("pushes/0", position(6, 2))]
    assert position(6, 1) == 6 << 20 | 1
    assert position(6, 1 << 20) is None  # past the index bits: sent, never taken as had


def test_the_memory_keeps_the_last_records_only() -> None:
    offered = Offered(max_records=2)
    offered.add([(("gw", 1), ["a"])])
    offered.add([(("gw", 2), ["b"])])
    offered.add([(("gw", 2), ["c"])])  # a third record: the first is forgotten
    assert offered.fresh("gw", 1, ["a"]) == ["a"]
    assert offered.fresh("gw", 2, ["b", "c", "x"]) == ["x"]

    few_users = Offered(max_records=10, max_users=3)
    few_users.add([(("gw", 1), ["a", "b"])])
    few_users.add([(("gw", 2), ["c", "d"])])  # four users: the oldest record goes
    assert few_users.fresh("gw", 1, ["a", "b"]) == ["a", "b"]
    assert few_users.fresh("gw", 2, ["c", "d"]) == []


def test_a_user_in_two_remembered_records_is_forgotten_once_without_failing() -> None:
    # A replayed record is remembered as it was, repeats and all; the same user may then
    # stand in two records, and forgetting the second must not fail (it once raised
    # KeyError and failed the push stage, whose record was then dead-lettered).
    offered = Offered(max_records=2)
    offered.add([(("gw", 1), ["a", "b"])])
    offered.add([(("gw", 1), ["a"])])
    offered.add([(("gw", 2), ["c"])])  # the first record goes, and "a", "b" with it
    offered.add([(("gw", 3), ["d"])])  # the second goes: "a" is already gone
    assert offered.fresh("gw", 1, ["a", "b"]) == ["a", "b"]
    assert offered.fresh("gw", 3, ["d"]) == []
    same_twice = Offered(max_records=1)
    same_twice.add([(("gw", 1), ["a"]), (("gw", 1), ["a"])])  # one record, a user twice
    same_twice.add([(("gw", 2), ["b"])])
    assert same_twice.fresh("gw", 1, ["a"]) == ["a"]
