"""What the gateway client tests share: a fast session config, outcome collection, messages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from resonance_task.gateway.client import PushOutcome, SessionConfig
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage

FAST = SessionConfig(
    batch_linger=0.005,
    ack_timeout=0.5,
    connect_timeout=0.3,
    backoff_min=0.05,
    backoff_max=0.2,
    max_attempts=2,
)


class Outcomes:
    def __init__(self) -> None:
        self.items: list[tuple[int, PushOutcome]] = []
        self.done = asyncio.Event()
        self.expected = 0

    def handler(self, msg_id: int) -> Callable[[PushOutcome], Any]:
        def on_done(outcome: PushOutcome) -> None:
            self.items.append((msg_id, outcome))
            if len(self.items) >= self.expected:
                self.done.set()

        return on_done

    async def wait(self, count: int, seconds: float = 10) -> None:
        self.expected = count
        async with asyncio.timeout(seconds):
            while len(self.items) < count:
                self.done.clear()
                await self.done.wait()


def message(msg_id: int, session: str = "s1", seq: int = 1) -> PushMessage:
    return PushMessage(msg_id=msg_id, seq_id=seq, session_id=session, content="x" * 50)
