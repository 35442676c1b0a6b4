"""Our murmur2 is Kafka's: the partition of a user agrees with every Kafka client's."""

from __future__ import annotations

from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from resonance_task.pipeline.partitioning import murmur2, partition_for


@given(st.binary(max_size=64))
def test_murmur2_agrees_with_aiokafka(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data) & 0xFFFFFFFF


def test_known_partitions() -> None:
    # Java's Utils.toPositive(Utils.murmur2(key)) % partitions, as the producer computes.
    for user in ("alice", "user-00001", "用户", ""):
        expected = (aiokafka_murmur2(user.encode()) & 0x7FFFFFFF) % 32
        assert partition_for(user, 32) == expected
