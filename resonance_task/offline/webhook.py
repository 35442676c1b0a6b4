"""A generic webhook: a batch of notifications as one JSON POST, signed with HMAC-SHA256.

Request: `{"notifications": [{"user", "token", "platform", "title", "body", "data",
"high_priority"}, ...]}` with header `X-Resonance-Signature: sha256=<hex of
HMAC-SHA256(secret, body)>` when a secret is set. A 2xx answer may name
`{"invalid_tokens": [...], "failed": [{"token", "error"}]}`; everything else in the
batch counts as delivered. 429 and 5xx retry the whole batch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence

import httpx

from resonance_task.offline.provider import (
    DELIVERED,
    Notification,
    Outcome,
    by_status,
    error_text,
    json_object,
)
from resonance_task.offline.ratelimit import TokenBucket, Unlimited

SIGNATURE_HEADER = "X-Resonance-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookProvider:
    name = "webhook"

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        url: str,
        secret: str = "",
        limiter: TokenBucket | Unlimited | None = None,
        max_batch: int = 500,
    ) -> None:
        self._client = client
        self._url = url
        self._secret = secret
        self._limiter = limiter or Unlimited()
        self.max_batch = max_batch

    async def send(self, batch: Sequence[Notification]) -> list[Outcome]:
        body = json.dumps(
            {
                "notifications": [
                    {
                        "user": n.user,
                        "token": n.device.token,
                        "platform": n.device.platform,
                        "title": n.title,
                        "body": n.body,
                        "data": dict(n.data),
                        "high_priority": n.high_priority,
                    }
                    for n in batch
                ]
            }
        ).encode()
        headers = {"content-type": "application/json"}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        await self._limiter.acquire()
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return [Outcome("retry", f"transport: {exc!r}")] * len(batch)
        if not response.is_success:
            outcome = by_status(response.status_code, response.headers, error_text(response.text))
            return [outcome] * len(batch)
        # The batch was taken: an answer we cannot read names no exceptions.
        answer = json_object(response.content)
        named = answer.get("invalid_tokens")
        invalid = {str(t) for t in named} if isinstance(named, list) else set()
        listed = answer.get("failed")
        failed = {
            str(f.get("token")): str(f.get("error", ""))
            for f in (listed if isinstance(listed, list) else [])
            if isinstance(f, dict)
        }
        out = []
        for n in batch:
            if n.device.token in invalid:
                out.append(Outcome("invalid_token", "named by the webhook"))
            elif n.device.token in failed:
                out.append(Outcome("failed", failed[n.device.token]))
            else:
                out.append(DELIVERED)
        return out

    async def close(self) -> None:
        return None
