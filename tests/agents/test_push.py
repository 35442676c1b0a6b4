"""push: a record's offset waits on every push it carried (no broker, no gateway)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
from aiokafka import ConsumerRecord

from agents.push import OfflineSink, PushConsumer
from gateway.client import GatewayPool, PushItem, PushOutcome, SessionConfig
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from proto.resonance.pipeline.v1.pipeline_pb2 import GatewayPushBatch
from tests.agents.conftest import Sink


class Refusing:
    """A gateway session that fails every push at once: its users go to offline push."""

    def __init__(self) -> None:
        self.answers: list[asyncio.Future[None]] = []

    def offer(self, item: PushItem) -> bool:
        outcome = PushOutcome(delivered=[], failed=item.users, reason="gateway_rejected")
        self.answers.append(asyncio.ensure_future(item.on_done(outcome)))
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
        pool=Pool(SessionConfig()),
        offline=offline,
        dead_letters=Sink().dead_letters(),
        topic="pushes",
        consumer_config={},
        batch_max_records=10,
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
