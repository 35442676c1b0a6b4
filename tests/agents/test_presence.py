"""presence: gateways' batches -> per-user changes -> routes; timestamps from the future clamped."""

from __future__ import annotations

import json

from aiokafka import AIOKafkaProducer

from resonance_task.agents.presence import RoutesStage, decode_changes, decode_sync
from resonance_task.commands.dlq import read_all
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.pipeline.backlog import OffsetProbe
from resonance_task.pipeline.dlq import DeadLetters
from resonance_task.pipeline.topic_view import TopicView
from resonance_task.proto.resonance.logic.v1.presence_pb2 import (
    SyncStatusRequest,
    UserOffline,
    UserOnline,
)
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import PresenceChange, PresenceChanges
from resonance_task.stage import StageOptions
from resonance_task.tables import routes as route_rules
from tests.kafka import make_topic, until

NOW = 1_800_000_000_000


def batch(online: list[UserOnline], offline: list[UserOffline]) -> bytes:
    request = SyncStatusRequest(gateway_id="gw-1", online_batch=online, offline_batch=offline)
    return request.SerializeToString()


def test_a_presence_change_from_the_future_cannot_pin_a_user_online() -> None:
    connect = UserOnline(username="u1", conn_id="c1", timestamp=NOW + 3_600_000)
    (online,) = decode_sync(batch([connect], []), NOW, now_ms=NOW, max_skew_ms=5_000)
    assert online.timestamp == NOW + 5_000
    route, _ = route_rules.apply_change(None, online, now_ms=NOW, keep_offline_ms=60_000)
    # The real disconnect, six seconds later by the gateway's (right) clock, wins.
    disconnect = UserOffline(username="u1", conn_id="c1", timestamp=NOW + 6_000)
    (offline,) = decode_sync(batch([], [disconnect]), NOW, now_ms=NOW + 6_000, max_skew_ms=5_000)
    route, applied = route_rules.apply_change(
        route, offline, now_ms=NOW + 6_000, keep_offline_ms=60_000
    )
    assert applied and not any(c["on"] for c in route.values())


def test_timestamps_within_the_skew_are_kept() -> None:
    connect = UserOnline(username="u1", conn_id="c1", timestamp=NOW + 4_000)
    (online,) = decode_sync(batch([connect], []), NOW, now_ms=NOW, max_skew_ms=5_000)
    assert online.timestamp == NOW + 4_000


def test_a_presence_by_user_record_is_a_batch_or_the_single_change_of_earlier_versions() -> None:
    one = PresenceChange(username="u1", gateway_id="gw", conn_id="c", online=True, timestamp=5)
    two = PresenceChange(username="u2", gateway_id="gw", conn_id="c", online=False, timestamp=6)
    batch = PresenceChanges(changes=[one, two]).SerializeToString()
    assert [c.username for c in decode_changes(batch)] == ["u1", "u2"]
    assert [c.username for c in decode_changes(one.SerializeToString())] == ["u1"]
    assert decode_changes(b"") == []


async def test_routes_stage_takes_a_partition_over_from_the_changelog_and_writes_changes(
    broker: EmbeddedBroker, tag: str
) -> None:
    """Real broker: a route Faust's table wrote (a JSON object) is where the stage starts;
    a batch and an earlier version's single change both apply; a stale one does not; a
    record that is neither is dead-lettered."""
    by_user, changelog = f"{tag}.by-user", f"{tag}-routes-changelog"
    for topic in (by_user, changelog, by_user + ".dlq"):
        await make_topic(broker, topic, 1)
    existing = {"phone": {"gw": "gw-1", "ts": NOW, "on": True, "pf": "ios"}}
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    await producer.send_and_wait(
        changelog,
        json.dumps(existing).encode(),
        key=route_rules.changelog_key("alice"),
        partition=0,
    )
    laptop = PresenceChange(
        username="alice", gateway_id="gw-2", conn_id="laptop", online=True, timestamp=NOW + 1
    )
    late = PresenceChange(
        username="alice", gateway_id="gw-1", conn_id="phone", online=False, timestamp=NOW - 1
    )
    bob = PresenceChange(username="bob", gateway_id="gw-3", conn_id="x", online=True, timestamp=NOW)
    for value in (
        PresenceChanges(changes=[laptop, late]).SerializeToString(),
        bob.SerializeToString(),  # as the Faust agent of earlier versions wrote them
        b"\xff\xff not protobuf",
    ):
        await producer.send_and_wait(by_user, value, partition=0)
    routes = route_rules.RoutesView()
    config = {"bootstrap_servers": broker.bootstrap, "fetch_max_wait_ms": 20}
    view = TopicView(topic=changelog, apply=routes.apply, consumer_config=config)
    probe = OffsetProbe(config)
    letters = DeadLetters(
        lambda topic, key, value, headers: producer.send(topic, value, key=key, headers=headers)
    )
    stage = RoutesStage(
        options=StageOptions(
            topics=(by_user,),
            consumer_config={
                **config,
                "group_id": f"{tag}-routes",
                "session_timeout_ms": 2000,
                "heartbeat_interval_ms": 500,
            },
            batch_max_records=10,
        ),
        changelog=changelog,
        view=routes,
        changelog_view=view,
        probe=probe,
        producer_config={"bootstrap_servers": broker.bootstrap},
        dead_letters=letters,
        keep_offline_seconds=300,
    )
    for service in (probe, view, stage):
        await service.start()
    try:
        await until(lambda: len(routes) == 2, 30)
        assert routes.get("alice") == ("gw-1", "gw-2")  # the phone stayed: the change was late
        assert routes.get("bob") == ("gw-3",)
        assert stage.applied == 2 and stage.stale == 1 and stage.takeovers == 1
        assert stage.owns(0) and stage.owned_routes == 2
        letters_read = await read_all(broker.bootstrap, by_user + ".dlq", 10)
        assert [dict(r.headers)["dlq.reason"] for r in letters_read] == [b"decode_error"]
    finally:
        for service in (stage, view, probe):
            await service.stop()
        await producer.stop()
