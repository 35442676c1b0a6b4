"""Where each stage's done work ends, per partition, kept in Redis between Kafka commits.

A Kafka offset commit costs a broker round trip (~50 ms on Tansu), so the group's
committed offsets trail what a stage has finished, and a SIGKILLed worker's successor
redoes that tail: pushes a gateway sees twice. A Redis write costs a fraction of a
millisecond, so each stage also marks here the end of its done prefix as soon as it
moves; a worker that takes a partition starts from the later of the two.

A mark only ever says "everything before this offset took effect", so starting from it
skips nothing undone. It is a hint: without Redis the stage runs on Kafka's offsets
alone, and a mark beyond the partition's end (the topic was recreated) is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis
from aiokafka import TopicPartition

log = logging.getLogger(__name__)

MARK_TTL_SECONDS = 7 * 24 * 3600


class OffsetMarks:
    def __init__(self, url: str, prefix: str, *, timeout: float = 2.0) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        self._prefix = prefix

    def _key(self, group: str, topic: str) -> str:
        return f"{self._prefix}:offsets:{{{group}}}:{topic}"

    async def save(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        by_topic: dict[str, dict[str, int]] = {}
        for tp, offset in offsets.items():
            by_topic.setdefault(tp.topic, {})[str(tp.partition)] = offset
        async with self._redis.pipeline(transaction=False) as pipe:
            for topic, fields in by_topic.items():
                key = self._key(group, topic)
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(key, MARK_TTL_SECONDS)
            await pipe.execute()

    async def load(self, group: str, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        tps = list(tps)
        out: dict[TopicPartition, int] = {}
        for topic in {tp.topic for tp in tps}:
            mine = [tp for tp in tps if tp.topic == topic]
            values = await self._redis.hmget(
                self._key(group, topic), [str(tp.partition) for tp in mine]
            )
            for tp, value in zip(mine, values, strict=True):
                if value is not None and value.isdigit():
                    out[tp] = int(value)
        return out

    async def close(self) -> None:
        await self._redis.aclose()
