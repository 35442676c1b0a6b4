"""registry: dead-letters the gateway heartbeats no gateways view can use.

Every worker reads the whole heartbeat topic into its own view (tables/gateways.py) and
skips what does not decode or lacks an id or address. Dead-lettering must happen once,
not once per worker, so this agent, which sees each record on one worker only, does it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from resonance_task.pipeline.dlq import DeadLetters, source_of
from resonance_task.tables.gateways import decode_heartbeat


def agent(dead_letters: DeadLetters) -> Callable[[Any], Awaitable[None]]:
    async def registry_agent(stream: Any) -> None:
        async for event in stream.events():
            record = source_of(event)
            await dead_letters.decoded(record, decode_heartbeat)

    return registry_agent
