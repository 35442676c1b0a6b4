"""The inbox store on a real Redis Cluster (3 masters, 3 replicas): a batch written across
every node, once, cursors gap-free, a bad key refused for its recipient alone."""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from resonance_task.embedded.redis import LocalRedisCluster
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.inbox import RedisInboxStore


def _message(msg_id: int) -> PushMessage:
    return PushMessage(msg_id=msg_id, seq_id=msg_id, session_id="s", content=f"m{msg_id}")


async def test_a_batch_is_written_across_the_cluster_once_and_in_order(
    redis_cluster: LocalRedisCluster, tag: str
) -> None:
    store = RedisInboxStore(redis_cluster.url, max_entries=0, message_ttl=600)
    users = [f"{tag}-u{i:03d}" for i in range(600)]
    batch = [(_message(10_000 + i), users) for i in range(3)]
    try:
        first = await store.write(batch)
        assert (first.new, first.duplicate, first.refused) == (1800, 0, ())
        # Written again (a redelivery after a crash): nothing twice.
        again = await store.write(batch)
        assert (again.new, again.duplicate) == (0, 1800)
        for user in users[::50]:
            entries = await store.read(user, 0, 10)
            assert [e.cursor for e in entries] == [1, 2, 3]
            assert [e.msg_id for e in entries] == [10_000, 10_001, 10_002]
            assert entries[0].message is not None and entries[0].message.content == "m10000"
        assert await store.last_cursors(users[:5]) == dict.fromkeys(users[:5], 3)
    finally:
        await store.close()
    # Every master holds some of the inboxes: the users' hash tags spread them.
    nodes = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    try:
        held = [
            len(list(redis.Redis(host=n.host, port=n.port).scan_iter(f"inbox:{{{tag}-*}}")))
            for n in nodes.get_primaries()  # type: ignore[no-untyped-call]
        ]
    finally:
        nodes.close()
    assert len(held) == 3 and all(count > 0 for count in held), held


async def test_a_key_of_the_wrong_type_refuses_only_its_recipient(
    redis_cluster: LocalRedisCluster, tag: str
) -> None:
    store = RedisInboxStore(redis_cluster.url, max_entries=0, message_ttl=600)
    users = [f"{tag}-w{i}" for i in range(20)]
    nodes = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    nodes.set(store.key(users[7]), "another service's string")
    try:
        result = await store.write([(_message(20_000), users)])
        assert result.new == 19
        assert [(r.user, r.msg_id) for r in result.refused] == [(users[7], 20_000)]
        assert result.refused[0].error.startswith("WRONGTYPE")
    finally:
        nodes.close()
        await store.close()
