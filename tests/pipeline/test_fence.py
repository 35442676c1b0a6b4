"""The presence fence against the real broker: covered only once every hop is through."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.pipeline.backlog import OffsetProbe
from resonance_task.pipeline.fence import Fence, Hop
from tests.kafka import make_topic, produce, view_of


async def commit_all(broker: EmbeddedBroker, group: str, topic: str) -> None:
    """What a stage commits once it has taken everything in `topic` on: every end."""
    probe = OffsetProbe({"bootstrap_servers": broker.bootstrap})
    ends = await probe.ends(topic)
    await probe.stop()
    consumer = AIOKafkaConsumer(
        group_id=group, bootstrap_servers=broker.bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.commit({tp: ends[tp.partition] for tp in tps if ends[tp.partition]})
    finally:
        await consumer.stop()


async def test_covered_once_each_hop_committed_and_the_view_read_its_end(
    broker: EmbeddedBroker, tag: str
) -> None:
    presence, by_user, changelog = f"{tag}.presence", f"{tag}.by-user", f"{tag}.changelog"
    for topic in (presence, by_user, changelog):
        await make_topic(broker, topic)
    # Each hop's records, as the stage before it would have produced them.
    await produce(broker, presence, [(i % 4, b"p%d" % i) for i in range(40)])
    await produce(broker, by_user, [(i % 4, b"u%d" % i) for i in range(8)])
    await produce(broker, changelog, [(i % 4, b"c%d" % i) for i in range(20)])
    seen: list[Any] = []
    view = view_of(broker, changelog, seen.append)
    probe = OffsetProbe({"bootstrap_servers": broker.bootstrap})
    fence = Fence(
        hops=[Hop(presence, f"{tag}-presence"), Hop(by_user, f"{tag}-routes")],
        view=view,
        probe=probe,
        timeout=5,
    )
    for service in (probe, view, fence):
        await service.start()
    try:
        assert not fence.fresh
        await commit_all(broker, f"{tag}-presence", presence)
        # The routes group has committed nothing: what it has not taken on may change routes.
        await asyncio.sleep(0.5)
        assert not fence.fresh and fence.covers == 0
        await commit_all(broker, f"{tag}-routes", by_user)
        assert await asyncio.wait_for(fence.wait_covered(), 10)
        assert len(seen) == 20  # the view had read the changelog's end when it was covered

        # Held again (a rebalance): what came since is covered before routing goes on.
        await produce(broker, presence, [(0, b"again")])
        await produce(broker, changelog, [(1, b"c-again")])
        fence.hold()
        assert not fence.fresh
        await commit_all(broker, f"{tag}-presence", presence)
        assert await asyncio.wait_for(fence.wait_covered(), 10)
        assert [r.value for r in seen][-1] == b"c-again"
        assert fence.covers == 2
    finally:
        for service in (fence, view, probe):
            await service.stop()


async def test_after_its_first_cover_a_fence_that_cannot_cover_gives_up_in_time(
    broker: EmbeddedBroker, tag: str
) -> None:
    presence, changelog = f"{tag}.presence", f"{tag}.changelog"
    for topic in (presence, changelog):
        await make_topic(broker, topic)
    view = view_of(broker, changelog, lambda r: None)
    probe = OffsetProbe({"bootstrap_servers": broker.bootstrap})
    fence = Fence(hops=[Hop(presence, f"{tag}-presence")], view=view, probe=probe, timeout=0.5)
    for service in (probe, view, fence):
        await service.start()
    try:
        assert await asyncio.wait_for(fence.wait_covered(), 10)  # nothing upstream yet
        await produce(broker, presence, [(2, b"never taken")])
        fence.hold()
        # Nobody takes that record on: fan-out waits the timeout, then routes on.
        assert await asyncio.wait_for(fence.wait_covered(), 5) is False
        assert not fence.fresh
    finally:
        for service in (fence, view, probe):
            await service.stop()
