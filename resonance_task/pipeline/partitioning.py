"""Which partition a user's records live on, for every user-keyed topic and table.

Kafka's default partitioner (murmur2 of the key bytes), so that a record keyed by user
from any Kafka client, the routes table's changelog and Faust's own key routing of
`/routes/{user}` all agree. We still set the partition ourselves when we produce:
external producers are not trusted to have used it.
"""

from __future__ import annotations

import struct
from functools import lru_cache

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (unsigned), as aiokafka.partitioner.murmur2 computes it, in half
    the time (a word at a time, not a byte): a reconnect storm is all new users, each
    hashed once on its way to the routes table (tests/pipeline/test_partitioning.py
    checks the two agree)."""
    length = len(data)
    h = _SEED ^ length
    tail = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:tail]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    extra = length & 3
    if extra == 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra:
        h = ((h ^ data[tail]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


@lru_cache(maxsize=1 << 20)
def _positive_hash(user: str) -> int:
    # Members of big groups repeat across messages: the cache turns the per-recipient
    # cost into one lookup.
    return murmur2(user.encode()) & 0x7FFFFFFF


def partition_for(user: str, partitions: int) -> int:
    return _positive_hash(user) % partitions
