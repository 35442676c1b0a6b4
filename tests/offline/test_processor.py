"""The offline push stage: real Redis device tokens, the real local provider server."""

from __future__ import annotations

import time

import pytest

from resonance_task.embedded.providers import ProviderServer
from resonance_task.offline.ratelimit import TokenBucket
from resonance_task.offline.records import decode as decode_offline
from resonance_task.offline.tokens import DeviceToken, RedisDeviceTokenStore
from resonance_task.pipeline.dlq import H_REASON, SourceRecord
from tests.offline.fakes import DeadSink, Providers, make_providers, pusher, record


async def test_offline_users_reach_their_devices_and_dead_tokens_are_forgotten(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    alice, bob, carol, dave = (f"{tag}-{n}" for n in ("alice", "bob", "carol", "dave"))
    await tokens.register(alice, DeviceToken("fcm", f"{tag}-a1", "android"))
    await tokens.register(bob, DeviceToken("apns", f"{tag}-b1", "ios"))
    await tokens.register(bob, DeviceToken("webhook", f"{tag}-b2", "web"))
    await tokens.register(dave, DeviceToken("fcm", f"{tag}-gone", "android"))
    providers.server.invalid_tokens.add(f"{tag}-gone")
    dead = DeadSink()
    await pusher(providers, tokens, dead).handle(
        [record([alice, bob, carol, dave]), SourceRecord("offline", 0, 1, None, b"\xff\x00")]
    )
    server = providers.server
    fcm = server.pushes("/v1/projects/demo/messages:send")
    assert sorted(r.body["message"]["token"] for r in fcm) == sorted([f"{tag}-a1", f"{tag}-gone"])
    assert fcm[0].body["message"]["notification"] == {"title": "bob in team", "body": "lunch?"}
    assert fcm[0].body["message"]["data"]["msg_id"] == "7"
    assert [r.path for r in server.pushes("/3/device/")] == [f"/3/device/{tag}-b1"]
    (hook,) = server.pushes("/webhook")
    assert [n["token"] for n in hook.body["notifications"]] == [f"{tag}-b2"]
    assert await tokens.tokens([dave]) == {}  # FCM said UNREGISTERED: forgotten
    assert len((await tokens.tokens([alice, bob]))[bob]) == 2
    # Only the garbage record is dead: no device (carol) is not a failure.
    assert [h[H_REASON] for _, _, h in dead.records] == [b"decode_error"]


async def test_retries_then_the_record_goes_to_the_dead_letter_topic(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    user = f"{tag}-erin"
    await tokens.register(user, DeviceToken("webhook", f"{tag}-e1"))
    providers.server.fail_next(1, 503)
    dead = DeadSink()
    await pusher(providers, tokens, dead).handle([record([user], msg_id=8)])
    assert len(providers.server.pushes("/webhook")) == 2 and dead.records == []  # retried, ok

    providers.server.fail_next(3, 500)
    await pusher(providers, tokens, dead).handle([record([user], msg_id=9, offset=5)])
    ((topic, value, headers),) = dead.records
    assert topic == "offline.dlq" and headers[H_REASON] == b"provider_failed"
    assert [p.message.msg_id for p in decode_offline(value)] == [9]
    assert b"webhook" in headers["dlq.error"]


# Client and server share one process here, which tops out near 200 requests/s on two
# cores: above that the test would measure the machine, not the limit. test_ratelimit
# covers the bucket alone at 1000/s.
@pytest.mark.parametrize(("limit", "count"), [(40.0, 120), (100.0, 200)])
async def test_the_rate_limit_holds(
    server: ProviderServer, tokens: RedisDeviceTokenStore, tag: str, limit: float, count: int
) -> None:
    p, clients = make_providers(server, {"fcm": TokenBucket(limit, burst=1)})
    users = [f"{tag}-r{i:03d}" for i in range(count)]
    for user in users:
        await tokens.register(user, DeviceToken("fcm", f"{user}-t"))
    started = time.monotonic()
    await pusher(p, tokens, DeadSink()).handle([record(users)])
    elapsed = time.monotonic() - started
    for client in clients:
        await client.aclose()
    sends = server.pushes("/v1/projects/demo/messages:send")
    assert len(sends) == count
    # Never faster than the limit, timed where the sends leave: the server shares the
    # process, and on a busy box it may note arrivals late and in bunches.
    assert elapsed >= (count - 1) / limit * 0.95, elapsed
    # Nor much slower. Past the first quarter: sends that waited for the connection and
    # HTTP/2 set-up (a quarter second on a busy CI box) arrive together.
    warm = sends[len(sends) // 4 :]
    rate = (len(warm) - 1) / (warm[-1].at - warm[0].at)
    assert rate >= limit * 0.8, rate
