"""Which partition a user's records live on, for every user-keyed topic and table.

Kafka's default partitioner (murmur2 of the key bytes), so that a record keyed by user
from any Kafka client, the routes table's changelog and Faust's own key routing of
`/routes/{user}` all agree. We still set the partition ourselves when we produce:
external producers are not trusted to have used it.
"""

from __future__ import annotations

from functools import lru_cache

from aiokafka.partitioner import murmur2


@lru_cache(maxsize=1 << 20)
def _positive_hash(user: str) -> int:
    # murmur2 is pure Python (~microseconds); members of big groups repeat across
    # messages, so the cache turns the per-recipient cost into one dict lookup.
    return int(murmur2(user.encode())) & 0x7FFFFFFF


def partition_for(user: str, partitions: int) -> int:
    return _positive_hash(user) % partitions
