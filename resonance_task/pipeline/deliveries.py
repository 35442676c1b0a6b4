"""The deliveries topic: inbox writes for storage, batched by partition, split by bytes.

A record is a DeliveryBatch: the messages of one fetched batch (or one large-group page)
whose sessions share a partition, each body once with its users. The partition is the
session's, so one conversation's records stay in order and storage writes each user's
messages of that conversation in order. Only we write and read this topic, so the
partition is CRC-32 of the session id (C speed), not Kafka's pure-Python murmur2. Few, large
records: most of a record's cost (producer, broker, consumer) is per record, not per byte.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import DeliveryBatch

_DELIVERY_OVERHEAD = 64  # flags, trace headers' framing, the Delivery's own tag and length


def session_partition(session_id: str, partitions: int) -> int:
    return zlib.crc32(session_id.encode()) % partitions


class DeliveryRecords:
    def __init__(self, *, partitions: int, max_users: int, max_bytes: int) -> None:
        self._partitions = partitions
        self._max_users = max_users
        self._max_bytes = max_bytes
        self._open: dict[int, tuple[DeliveryBatch, list[int]]] = {}
        self._done: list[tuple[int, DeliveryBatch]] = []
        self.deliveries = 0
        self.recipients = 0

    def add(
        self,
        message: PushMessage,
        users: Sequence[str],
        *,
        priority: int = 0,
        trace_headers: Mapping[str, str] | None = None,
        page: int = 0,
    ) -> None:
        """Every user in `users` gets `message` in the inbox (users already deduplicated)."""
        if not users:
            return
        partition = session_partition(message.session_id, self._partitions)
        body = message.ByteSize() + _DELIVERY_OVERHEAD
        if trace_headers:
            body += sum(len(k) + len(v) + 4 for k, v in trace_headers.items())
        ascii_only = "".join(users).isascii()
        costs = [len(u) + 2 for u in users] if ascii_only else [len(u.encode()) + 2 for u in users]
        total = body + sum(costs)
        if total <= self._max_bytes and len(users) <= self._max_users:
            # Most messages: one Delivery, no per-user walk (a 5,000-member page is one).
            self._append(partition, total, message, users, priority, page)
            if trace_headers:
                self._open[partition][0].deliveries[-1].trace_headers.update(trace_headers)
            self.recipients += len(users)
            return
        start = 0
        while start < len(users):
            end, size = start, body
            # At least one user per Delivery, however long the name: nothing is dropped here.
            while end < len(users) and end - start < self._max_users:
                cost = costs[end]
                if end > start and size + cost > self._max_bytes:
                    break
                size += cost
                end += 1
            self._append(partition, size, message, users[start:end], priority, page)
            if trace_headers:
                self._open[partition][0].deliveries[-1].trace_headers.update(trace_headers)
            start = end
        self.recipients += len(users)

    def _append(
        self,
        partition: int,
        size: int,
        message: PushMessage,
        users: Sequence[str],
        priority: int,
        page: int,
    ) -> None:
        current = self._open.get(partition)
        if current is not None and current[1][0] + size > self._max_bytes:
            self._done.append((partition, current[0]))
            current = None
        if current is None:
            current = self._open[partition] = (DeliveryBatch(), [0])
        current[0].deliveries.add(message=message, users=users, priority=priority, page=page)
        current[1][0] += size
        self.deliveries += 1

    def records(self) -> list[tuple[int, bytes]]:
        """(partition, value) of every deliveries record, in the order they were filled."""
        done = self._done + [(p, batch) for p, (batch, _) in self._open.items()]
        return [(partition, batch.SerializeToString()) for partition, batch in done]
