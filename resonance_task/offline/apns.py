"""Apple Push Notification service over HTTP/2, with token-based (JWT, ES256) auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx
import jwt

from resonance_task.offline.provider import (
    DELIVERED,
    Notification,
    Outcome,
    by_status,
    error_text,
    json_object,
)
from resonance_task.offline.ratelimit import TokenBucket, Unlimited

DEFAULT_BASE_URL = "https://api.push.apple.com"
# APNs refuses provider tokens older than an hour, and refreshes more often than every
# 20 minutes (TooManyProviderTokenUpdates).
TOKEN_LIFETIME = 50 * 60
INVALID_REASONS = {"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"}
# How long APNs keeps a notification for a device that is off. 0 would mean "now or
# never", and an offline user's phone is often off: a message should still show up later.
DEFAULT_EXPIRATION = 24 * 3600


def http2_client(timeout: float) -> httpx.AsyncClient:
    # APNs speaks only HTTP/2; over plain http (a local test server) this is h2c.
    return httpx.AsyncClient(http1=False, http2=True, timeout=timeout)


class ApnsProvider:
    name = "apns"
    max_batch = 500

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        team_id: str,
        key_id: str,
        private_key: str,
        topic: str,
        base_url: str = DEFAULT_BASE_URL,
        limiter: TokenBucket | Unlimited | None = None,
        concurrency: int = 50,
        expiration_seconds: int = DEFAULT_EXPIRATION,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._team_id = team_id
        self._key_id = key_id
        self._key = private_key
        self._topic = topic
        self._limiter = limiter or Unlimited()
        self._slots = asyncio.Semaphore(concurrency)
        self._expiration = expiration_seconds
        self._jwt: str | None = None
        self._jwt_at = 0.0

    def _bearer(self) -> str:
        now = time.time()
        if self._jwt is None or now - self._jwt_at > TOKEN_LIFETIME:
            self._jwt = jwt.encode(
                {"iss": self._team_id, "iat": int(now)},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self._jwt_at = now
        return self._jwt

    async def send(self, batch: Sequence[Notification]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one(n) for n in batch)))

    async def _one(self, note: Notification) -> Outcome:
        payload = {
            "aps": {
                "alert": {"title": note.title, "body": note.body},
                "sound": "default",
                "thread-id": note.data.get("session_id", ""),
            },
            **note.data,
        }
        expires = int(time.time()) + self._expiration if self._expiration > 0 else 0
        headers = {
            "authorization": f"bearer {self._bearer()}",
            "apns-topic": self._topic,
            "apns-push-type": "alert",
            "apns-priority": "10" if note.high_priority else "5",
            "apns-expiration": str(expires),
        }
        async with self._slots:
            await self._limiter.acquire()
            try:
                response = await self._client.post(
                    f"{self._base}/3/device/{note.device.token}", json=payload, headers=headers
                )
            except httpx.HTTPError as exc:
                return Outcome("retry", f"transport: {exc!r}")
        if response.status_code == 200:
            return DELIVERED
        reason = str(json_object(response.content).get("reason", "")) or response.text
        if response.status_code == 410 or reason in INVALID_REASONS:
            return Outcome("invalid_token", reason)
        if reason == "ExpiredProviderToken":
            self._jwt = None
            return Outcome("retry", reason)
        return by_status(response.status_code, response.headers, error_text(reason))

    async def close(self) -> None:
        return None
