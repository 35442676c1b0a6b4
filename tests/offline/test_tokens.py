"""Device tokens written the way an account service may write them (real Redis)."""

from __future__ import annotations

import redis.asyncio as aioredis

from resonance_task.offline.tokens import DeviceToken, RedisDeviceTokenStore
from tests.offline.fakes import DeadSink, Providers, pusher, record


async def test_every_reasonable_layout_is_read_and_the_rest_is_refused_per_user(
    tokens: RedisDeviceTokenStore, redis_client: aioredis.Redis, tag: str
) -> None:
    ann, ben, cy = f"{tag}-ann", f"{tag}-ben", f"{tag}-cy"
    await tokens.register(ann, DeviceToken("fcm", "ours", "android"))  # our own layout
    await redis_client.hset(
        f"devices:{{{ann}}}",
        mapping={
            "apns:t-ios": "ios",  # a bare platform name
            "FCM:t-ts": "1700000000000",  # a registration time, provider in capitals
            "t-web": '{"provider": "webhook", "platform": "web"}',  # the token alone
            "t-none": "not json {",  # says no provider: refused
            "pigeon:t-x": "{}",  # no such provider: refused
            "fcm:t-bytes": b"\xff\xfe",  # not UTF-8
        },
    )
    await redis_client.set(f"devices:{{{ben}}}", "x")  # not a hash at all
    await tokens.register(cy, DeviceToken("webhook", "w", "web"))
    found = await tokens.tokens([ann, ben, cy])
    assert sorted(found[ann], key=lambda d: d.token) == [
        DeviceToken("fcm", "ours", "android"),
        DeviceToken("fcm", "t-bytes", ""),
        DeviceToken("apns", "t-ios", "ios"),
        DeviceToken("fcm", "t-ts", ""),
        DeviceToken("webhook", "t-web", "web"),
    ]
    assert ben not in found
    assert found[cy] == [DeviceToken("webhook", "w", "web")]


async def test_a_non_json_token_value_does_not_stall_offline_push(
    providers: Providers, tokens: RedisDeviceTokenStore, redis_client: aioredis.Redis, tag: str
) -> None:
    ann, ben = f"{tag}-ann", f"{tag}-ben"
    await redis_client.hset(f"devices:{{{ann}}}", "webhook:t1", "garbage{")
    await redis_client.set(f"devices:{{{ben}}}", "x")
    dead = DeadSink()
    await pusher(providers, tokens, dead).handle([record([ann, ben])])
    assert len(providers.server.pushes("/")) == 1 and dead.records == []
