"""Device tokens per user: where a user's phones and browsers can be reached offline.

Redis layout: `devices:{<user>}`, a hash; field `<provider>:<token>`, value JSON with the
platform and the time it was registered. One pipeline reads a whole batch of users.

The account service registers tokens, not us, so a value is read however it was written:
JSON with `platform` (and maybe `provider`/`token`), a bare platform name, a timestamp or
nothing. What cannot name a provider and a token (or a key that is not a hash) is refused
for that user alone, counted in resonance_offline_skipped_total, never retried.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import ResponseError

from resonance_task.offline import metrics
from resonance_task.stores.redis_client import connect

log = logging.getLogger(__name__)

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


def parse_device(field: str, value: str) -> DeviceToken | None:
    """A device from one hash entry, or None when it does not say where to push."""
    provider, sep, token = field.partition(":")
    details: dict[str, object] = {}
    try:
        parsed = json.loads(value) if value else {}
    except ValueError:
        parsed = value  # a bare platform name, as some services write it
    if isinstance(parsed, dict):
        details = parsed
    elif isinstance(parsed, str) and parsed.isidentifier():
        details = {"platform": parsed}
    if not sep:  # the field is the token alone: the value must name the provider
        provider, token = str(details.get("provider", "")), field
    provider = provider.strip().lower()
    token = str(details.get("token") or token).strip()
    if provider not in PROVIDERS or not token:
        return None
    platform = details.get("platform", "")
    return DeviceToken(provider, token, platform if isinstance(platform, str) else "")


def _key(user: str) -> str:
    return f"devices:{{{user}}}"


class RedisDeviceTokenStore:
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        # Bytes, decoded here: one value that is not UTF-8 must not fail the whole read.
        self._redis = connect(url, timeout=timeout)

    async def tokens(self, users: Sequence[str]) -> dict[str, list[DeviceToken]]:
        pipe = self._redis.pipeline(transaction=False)
        for user in users:
            pipe.hgetall(_key(user))
        out: dict[str, list[DeviceToken]] = {}
        # Per-user errors (a key that is not a hash) come back as values, not raised.
        replies = await pipe.execute(raise_on_error=False)
        for user, fields in zip(users, replies, strict=True):
            if isinstance(fields, ResponseError):
                metrics.SKIPPED.labels("token_store_refused").inc()
                log.error("device tokens of %r unreadable: %s", user, fields)
                continue
            if isinstance(fields, Exception):
                raise fields  # connection trouble: the caller retries the batch
            for field, raw in fields.items():
                device = parse_device(field.decode(errors="replace"), raw.decode(errors="replace"))
                if device is None:
                    metrics.SKIPPED.labels("token_unreadable").inc()
                    log.warning("device token of %r unreadable: %r = %r", user, field, raw)
                    continue
                out.setdefault(user, []).append(device)
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
