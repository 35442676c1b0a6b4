"""Firebase Cloud Messaging, HTTP v1 API: one request per device token.

Auth is OAuth 2: a JWT signed with the service account's key (RS256) is exchanged at the
account's `token_uri` for an access token, cached until a minute before it expires.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

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

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_BASE_URL = "https://fcm.googleapis.com"


class AccessTokens(Protocol):
    async def token(self) -> str: ...

    def forget(self) -> None: ...


class StaticToken:
    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def forget(self) -> None:
        return None


class ServiceAccount:
    """Access tokens for a Google service account (its JSON key file's fields)."""

    def __init__(self, info: dict[str, Any], client: httpx.AsyncClient) -> None:
        self._email = info["client_email"]
        self._key = info["private_key"]
        self._token_uri = info.get("token_uri", "https://oauth2.googleapis.com/token")
        self._client = client
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    @classmethod
    def from_file(cls, path: str, client: httpx.AsyncClient) -> ServiceAccount:
        return cls(json.loads(Path(path).read_text()), client)

    async def token(self) -> str:
        async with self._lock:  # one exchange for all concurrent senders
            if self._token is None or time.time() > self._expires - 60:
                now = int(time.time())
                assertion = jwt.encode(
                    {
                        "iss": self._email,
                        "scope": SCOPE,
                        "aud": self._token_uri,
                        "iat": now,
                        "exp": now + 3600,
                    },
                    self._key,
                    algorithm="RS256",
                )
                response = await self._client.post(
                    self._token_uri,
                    data={
                        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                        "assertion": assertion,
                    },
                )
                response.raise_for_status()
                body = response.json()
                self._token = str(body["access_token"])
                self._expires = now + float(body.get("expires_in", 3600))
            return self._token

    def forget(self) -> None:
        self._token = None


class FcmProvider:
    name = "fcm"
    max_batch = 500

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        project_id: str,
        credentials: AccessTokens,
        base_url: str = DEFAULT_BASE_URL,
        limiter: TokenBucket | Unlimited | None = None,
        concurrency: int = 50,
    ) -> None:
        self._client = client
        self._url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self._credentials = credentials
        self._limiter = limiter or Unlimited()
        self._slots = asyncio.Semaphore(concurrency)

    async def send(self, batch: Sequence[Notification]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one(n) for n in batch)))

    async def _one(self, note: Notification) -> Outcome:
        message = {
            "token": note.device.token,
            "notification": {"title": note.title, "body": note.body},
            "data": dict(note.data),
            "android": {"priority": "HIGH" if note.high_priority else "NORMAL"},
        }
        async with self._slots:
            for attempt in (1, 2):  # a second time only after a rejected access token
                await self._limiter.acquire()
                try:
                    headers = {"Authorization": f"Bearer {await self._credentials.token()}"}
                    response = await self._client.post(
                        self._url, json={"message": message}, headers=headers
                    )
                except httpx.HTTPError as exc:
                    return Outcome("retry", f"transport: {exc!r}")
                if response.status_code == 401 and attempt == 1:
                    self._credentials.forget()
                    continue
                return classify(response)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


def classify(response: httpx.Response) -> Outcome:
    if response.status_code == 200:
        return DELIVERED
    error = json_object(response.content).get("error")
    if not isinstance(error, dict):
        error = {}
    details = error.get("details")
    codes = {d.get("errorCode") for d in details or [] if isinstance(d, dict)}
    status = str(error.get("status", ""))
    message = str(error.get("message", ""))
    if "UNREGISTERED" in codes or (
        status == "INVALID_ARGUMENT" and "registration token" in message.lower()
    ):
        return Outcome("invalid_token", error_text(message or status))
    return by_status(response.status_code, response.headers, error_text(error or response.text))
