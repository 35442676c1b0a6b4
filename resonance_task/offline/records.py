"""The offline-pushes topic's records: OfflinePushBatch, many messages' offline users each.

One record per fetched batch, not one per message: a record costs the producer, the
broker and the consumer about as much as its bytes do (issue 8's profile: a send per
offline message was 9% of the fan-out stage's time).
"""

from __future__ import annotations

from collections.abc import Iterable

from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush, OfflinePushBatch

_OVERHEAD = 64  # a push's own framing inside the batch


def encode(pushes: Iterable[OfflinePush], max_bytes: int) -> list[bytes]:
    """The pushes as records of at most `max_bytes` (one push alone may be the whole)."""
    records: list[bytes] = []
    batch, size = OfflinePushBatch(), 0
    for push in pushes:
        cost = push.ByteSize() + _OVERHEAD
        if batch.pushes and size + cost > max_bytes:
            records.append(batch.SerializeToString())
            batch, size = OfflinePushBatch(), 0
        batch.pushes.append(push)
        size += cost
    if batch.pushes:
        records.append(batch.SerializeToString())
    return records


def decode(value: bytes | None) -> list[OfflinePush]:
    """An offline-pushes record's pushes; raises DecodeError if it is not one."""
    return list(OfflinePushBatch.FromString(value or b"").pushes)
