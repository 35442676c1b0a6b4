"""Router unit tests, with dicts standing in for the routes and gateways tables."""

from __future__ import annotations

import time

from agents.route import Router
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from proto.resonance.pipeline.v1.pipeline_pb2 import (
    Delivery,
    GatewayPush,
    GatewayPushBatch,
    OfflinePush,
)
from tables.gateways import GatewayInfo


def now_ms() -> int:
    return int(time.time() * 1000)


def gateway(ts: int, draining: bool = False) -> GatewayInfo:
    return GatewayInfo(address="127.0.0.1:1", ts=ts, seen=ts, connections=1, draining=draining)


def conn(gw: str, on: bool = True) -> dict[str, object]:
    return {"gw": gw, "ts": 1, "on": on, "pf": ""}


class Sent:
    def __init__(self) -> None:
        self.pushes: list[GatewayPush] = []
        self.offline: list[OfflinePush] = []

    async def push(self, gateway_id: str, value: bytes) -> None:
        batch = GatewayPushBatch.FromString(value)
        assert all(p.message.msg_id for p in batch.pushes)
        self.pushes.extend(
            GatewayPush(gateway_id=batch.gateway_id, message=p.message, users=p.users)
            for p in batch.pushes
        )

    async def off(self, key: bytes, value: bytes) -> None:
        self.offline.append(OfflinePush.FromString(value))


def router(routes: dict[str, object], gateways: dict[str, GatewayInfo], sent: Sent) -> Router:
    return Router(
        routes=routes,
        gateways=gateways,
        send_push=sent.push,
        send_offline=sent.off,
        gateway_timeout_seconds=5,
    )


async def test_groups_by_gateway_skips_sender_and_sends_the_rest_offline() -> None:
    t = now_ms()
    routes: dict[str, object] = {
        "a": {"c1": conn("g1")},
        "b": {"c1": conn("g1"), "c2": conn("g2")},
        "c": {"c1": conn("g2", on=False)},
        "s": {"c1": conn("g1")},
    }
    sent = Sent()
    msg = PushMessage(msg_id=1, from_username="s")
    await router(routes, {"g1": gateway(t), "g2": gateway(t)}, sent).route(
        Delivery(message=msg, users=["s", "a", "b", "c", "d"])
    )
    by_gw = {p.gateway_id: sorted(p.users) for p in sent.pushes}
    assert by_gw == {"g1": ["a", "b"], "g2": ["b"]}
    assert [sorted(o.users) for o in sent.offline] == [["c", "d"]]


async def test_persist_only_pushes_nothing() -> None:
    sent = Sent()
    await router({"a": {"c": conn("g1")}}, {"g1": gateway(now_ms())}, sent).route(
        Delivery(message=PushMessage(msg_id=2), users=["a"], persist_only=True)
    )
    assert sent.pushes == [] and sent.offline == []


async def test_draining_and_long_silent_gateways_get_nothing_and_are_collected() -> None:
    t = now_ms()
    routes: dict[str, object] = {
        "a": {"c1": conn("old"), "c2": conn("drain")},
        "b": {"c1": conn("old")},
        "c": {"c1": conn("live")},
    }
    gateways = {"old": gateway(t - 120_000), "drain": gateway(t, draining=True), "live": gateway(t)}
    sent = Sent()
    await router(routes, gateways, sent).route(
        Delivery(message=PushMessage(msg_id=3), users=["a", "b", "c"])
    )
    assert [p.users for p in sent.pushes] == [["c"]]
    assert sorted(sent.offline[0].users) == ["a", "b"]
    assert routes["a"] == {"c1": conn("old"), "c2": conn("drain")}  # left for presence to clean


async def test_a_batch_sends_one_record_per_gateway_in_order() -> None:
    t = now_ms()
    routes: dict[str, object] = {"a": {"c": conn("g1")}, "b": {"c": conn("g1")}}
    records: list[GatewayPushBatch] = []

    async def push(gateway_id: str, value: bytes) -> None:
        records.append(GatewayPushBatch.FromString(value))

    r = Router(
        routes=routes,
        gateways={"g1": gateway(t)},
        send_push=push,
        send_offline=Sent().off,
        gateway_timeout_seconds=5,
    )
    await r.route_batch(
        [Delivery(message=PushMessage(msg_id=i, seq_id=i), users=["a", "b"]) for i in (1, 2, 3)]
    )
    (record,) = records
    assert [p.message.seq_id for p in record.pushes] == [1, 2, 3]
