"""Device tokens per user: where a user's phones and browsers can be reached offline.

Redis layout: `devices:{<user>}`, a hash; field `<provider>:<token>`, value JSON with the
platform and the time it was registered. One pipeline reads a whole batch of users.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

PROVIDERS = ("fcm", "apns", "webhook")


@dataclass(frozen=True)
class DeviceToken:
    provider: str  # "fcm", "apns" or "webhook"
    token: str
    platform: str = ""  # "android", "ios", "web", ...


class DeviceTokenStore(Protocol):
    async def tokens(self, users: Sequence[str]) -> dict[str, list[DeviceToken]]:
        """The tokens of each user that has any."""

    async def register(self, user: str, device: DeviceToken) -> None: ...

    async def remove(self, user: str, device: DeviceToken) -> None: ...

    async def close(self) -> None: ...


def _key(user: str) -> str:
    return f"devices:{{{user}}}"


class RedisDeviceTokenStore:
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )

    async def tokens(self, users: Sequence[str]) -> dict[str, list[DeviceToken]]:
        pipe = self._redis.pipeline(transaction=False)
        for user in users:
            pipe.hgetall(_key(user))
        out: dict[str, list[DeviceToken]] = {}
        for user, fields in zip(users, await pipe.execute(), strict=True):
            for field, raw in fields.items():
                provider, _, token = field.partition(":")
                platform = json.loads(raw).get("platform", "")
                out.setdefault(user, []).append(DeviceToken(provider, token, platform))
        return out

    async def register(self, user: str, device: DeviceToken) -> None:
        if device.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {device.provider!r}; one of {PROVIDERS}")
        value = json.dumps({"platform": device.platform, "at": int(time.time() * 1000)})
        await self._redis.hset(_key(user), f"{device.provider}:{device.token}", value)

    async def remove(self, user: str, device: DeviceToken) -> None:
        await self._redis.hdel(_key(user), f"{device.provider}:{device.token}")

    async def close(self) -> None:
        await self._redis.aclose()
