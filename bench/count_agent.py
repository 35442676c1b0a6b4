"""A Faust app whose one agent only counts records: Faust's own per-record ceiling.

    COUNT_TOPIC=... KAFKA_BROKER_URL=... faust -A bench.count_agent worker

The benchmark runs it on the same push-event records the pipeline read, with the same
broker settings as the worker, and reads `/count`: the 1:1 target is a share of this.
"""

from __future__ import annotations

import os
import time
from typing import Any

import faust

from resonance_task.embedded import tansu

tansu.register()
app = faust.App(
    os.environ.get("APP_ID", "count-only"),
    broker=tansu.broker_url(os.environ["KAFKA_BROKER_URL"]),
    store="memory://",
    web_port=int(os.environ.get("WEB_PORT", "6067")),
    web_in_thread=False,
    datadir=os.environ.get("DATA_DIR", "count-only-data"),
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=2.0,
    broker_heartbeat_interval=0.5,
)
records = app.topic(os.environ["COUNT_TOPIC"], key_serializer="raw", value_serializer="raw")
state: dict[str, float] = {"counted": 0, "first": 0.0, "last": 0.0}


@app.agent(records)
async def count(stream: Any) -> None:
    async for _ in stream:
        now = time.monotonic()
        state["first"] = state["first"] or now
        state["last"] = now
        state["counted"] += 1


@app.page("/count")
async def counted(self: Any, request: Any) -> Any:
    return self.json(state)


@app.page("/ready")
async def ready(self: Any, request: Any) -> Any:
    return self.json({"ready": True})
