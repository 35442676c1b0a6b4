"""Router unit tests: the routes and gateways views decide who is pushed where."""

from __future__ import annotations

from resonance_task.offline.records import decode as decode_offline
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import GatewayPushBatch
from tests.agents.outputs import router


def pushed(records: list[tuple[bytes, bytes]]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for key, value in records:
        batch = GatewayPushBatch.FromString(value)
        assert key == batch.gateway_id.encode()
        out.setdefault(batch.gateway_id, []).extend(list(p.users) for p in batch.pushes)
    return out


def test_groups_by_gateway_skips_sender_and_sends_the_rest_offline() -> None:
    plan = router({"a": ["g1"], "b": ["g1", "g2"], "s": ["g1"]}, "g1", "g2").plan()
    plan.add(PushMessage(msg_id=1, from_username="s"), ["s", "a", "b", "c", "d"])
    assert pushed(plan.gateway_records()) == {"g1": [["a", "b"]], "g2": [["b"]]}
    (offline,) = [p for v in plan.offline_records() for p in decode_offline(v)]
    assert sorted(offline.users) == ["c", "d"] and offline.reason == "not_online"


def test_draining_and_long_silent_gateways_get_nothing() -> None:
    plan = router(
        {"a": ["old", "drain"], "b": ["old"], "c": ["live"]},
        "live",
        silent=("old",),
        draining=("drain",),
    ).plan()
    plan.add(PushMessage(msg_id=3), ["a", "b", "c"])
    assert pushed(plan.gateway_records()) == {"live": [["c"]]}
    assert sorted(decode_offline(plan.offline_records()[0])[0].users) == ["a", "b"]


def test_online_only_diverts_nobody() -> None:
    plan = router({"a": ["g1"]}, "g1").plan()
    plan.add(PushMessage(msg_id=4), ["a", "b"], online_only=True)
    assert pushed(plan.gateway_records()) == {"g1": [["a"]]}
    assert plan.offline_records() == []


def test_a_batch_is_one_record_per_gateway_in_message_order() -> None:
    plan = router({"a": ["g1"], "b": ["g1"]}, "g1").plan()
    for i in (1, 2, 3):
        plan.add(PushMessage(msg_id=i, seq_id=i), ["a", "b"])
    ((_, value),) = plan.gateway_records()
    assert [p.message.seq_id for p in GatewayPushBatch.FromString(value).pushes] == [1, 2, 3]


def test_records_are_split_by_bytes_and_keep_their_order() -> None:
    users = [f"user-{i:06d}" for i in range(20_000)]
    route = router({u: ["g1"] for u in users}, "g1")
    route.record_max_bytes = 64 * 1024
    plan = route.plan()
    for i in (1, 2):
        plan.add(PushMessage(msg_id=i, content="x" * 1000), users)
    records = plan.gateway_records()
    assert len(records) > 2 and all(len(v) <= 64 * 1024 for _, v in records)
    seen = [
        (p.message.msg_id, u)
        for _, v in records
        for p in GatewayPushBatch.FromString(v).pushes
        for u in p.users
    ]
    assert seen == [(i, u) for i in (1, 2) for u in users]
