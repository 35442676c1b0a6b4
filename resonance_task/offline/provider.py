"""What every push provider speaks: notifications in, one outcome per notification out."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from resonance_task.offline.tokens import DeviceToken

Result = Literal["delivered", "invalid_token", "retry", "failed"]


@dataclass(frozen=True)
class Notification:
    user: str
    device: DeviceToken
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)
    high_priority: bool = False
    record: int = 0  # which record of the batch it came from, for the dead-letter topic


@dataclass(frozen=True)
class Outcome:
    result: Result
    detail: str = ""
    retry_after: float | None = None  # seconds, when the provider said


DELIVERED = Outcome("delivered")


class Provider(Protocol):
    name: str
    max_batch: int  # notifications per send() call

    async def send(self, batch: Sequence[Notification]) -> list[Outcome]:
        """One outcome per notification, in order. Transport errors are `retry` outcomes."""

    async def close(self) -> None: ...


def retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def by_status(status: int, headers: Mapping[str, str], detail: str) -> Outcome:
    """What a provider's non-success status means, when nothing more specific applies."""
    if status == 429 or status >= 500:
        return Outcome("retry", f"{status} {detail}".strip(), retry_after(headers))
    return Outcome("failed", f"{status} {detail}".strip())


def error_text(payload: Any) -> str:
    return str(payload)[:300]


def json_object(content: bytes) -> dict[str, Any]:
    """A response body as a JSON object, or {}: error bodies from proxies and load
    balancers in front of a provider are HTML or plain text as often as not."""
    try:
        value = json.loads(content) if content else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
