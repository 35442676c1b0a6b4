"""Deferral, for a stage whose records come due later (the task retry topics): a
partition's records from an offset on are not for now, the other partitions go on."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from resonance_task.stage.offsets import Segment


class Deferral:
    def __init__(self) -> None:
        self._consumer: AIOKafkaConsumer | None = None
        self._deferred: dict[TopicPartition, int] = {}

    def bind(self, consumer: AIOKafkaConsumer | None) -> None:
        self._consumer = consumer
        self._deferred.clear()

    def defer(self, tp: TopicPartition, offset: int, seconds: float) -> None:
        """From `handle`: `tp` is paused for `seconds` and fetched again from `offset`
        then; nothing of it from there on counts as done."""
        consumer = self._consumer
        assert consumer is not None
        self._deferred[tp] = offset
        consumer.seek(tp, offset)
        consumer.pause(tp)
        asyncio.get_running_loop().call_later(max(0.0, seconds), self._undefer, consumer, tp)

    def cut(self, segments: dict[TopicPartition, Segment]) -> None:
        """After the batch was handled: its segments end where their partition was deferred."""
        deferred, self._deferred = self._deferred, {}
        for tp, offset in deferred.items():
            segment = segments.get(tp)
            if segment is not None:
                segment.end = offset  # fetched again when due

    def _undefer(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        # Only on the consumer that paused it, and only if the partition is still ours.
        mine = self._consumer is consumer
        if mine and tp in consumer.assignment():
            consumer.resume(tp)
