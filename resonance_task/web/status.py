"""GET /status: one HTML page a person opens (behind the same bearer token as the views).

Workers and the partitions each stage holds, gateways with their state and queue depth,
depth and lag per topic, dead letters held, large-group jobs and tasks per state: what
the JSON views answer, rendered on the server (no script, nothing fetched by the
browser), refreshed every 5 seconds. A part that cannot be read now (Redis or the broker
away) says so in its place; the rest of the page still shows.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import web
from faust.web import View

from resonance_task.pipeline.backlog import backlog, partitions_of
from resonance_task.pipeline.workers import WorkerDirectory
from resonance_task.stage import GroupConsumer
from resonance_task.tasks.setup import TaskSide
from resonance_task.web.views import Topology, gateways_json, large_groups_json

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 3.0

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #1d2430; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #d5dae1; }
table { border-collapse: collapse; margin-top: 0.4em; }
th, td { padding: 3px 10px; text-align: left; border-bottom: 1px solid #eef0f3; }
th { background: #f4f6f8; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #137333; } .warn { color: #b06000; } .bad { color: #c5221f; font-weight: bold; }
.muted { color: #6b7480; }
"""

_STATE_CLASS = {
    "up": "ok",
    "healthy": "ok",
    "draining": "warn",
    "down": "bad",
    "unhealthy": "bad",
}


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int | float):
        return f'<td class="n">{value:,}</td>'
    if value is None:
        return '<td class="muted">-</td>'
    text = html.escape(str(value))
    css = _STATE_CLASS.get(str(value))
    return f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> str:
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{body}</table>"


async def _section(title: str, render: Callable[[], Awaitable[str]]) -> str:
    try:
        body = await asyncio.wait_for(render(), READ_TIMEOUT_SECONDS)
    except Exception as exc:
        log.warning("status page: %s not read: %r", title, exc)
        body = f'<p class="bad">not available now: {html.escape(type(exc).__name__)}</p>'
    return f"<h2>{html.escape(title)}</h2>{body}"


def register(
    app: Any,
    topology: Topology,
    directory: WorkerDirectory,
    side: TaskSide | None,
    dead_letter_topics: Sequence[str],
) -> None:
    async def workers() -> str:
        rows = []
        for worker in await directory.workers():
            stages = worker.get("stages") or {}
            held = "; ".join(
                f"{name} {','.join(map(str, sorted(set(stats.get('assigned') or [])))) or '-'}"
                for name, stats in sorted(stages.items())
            )
            age = (time.time() * 1000 - worker.get("seen_at", 0)) / 1000
            rows.append((worker.get("worker"), worker.get("web_url"), held, round(age, 1)))
        return _table(
            ("worker", "web", "partitions per stage", "seen (s ago)"), rows, "no worker alive"
        )

    async def gateways() -> str:
        rows = []
        for gateway in gateways_json(topology):
            session = gateway.get("session") or {}
            health = None
            if session:
                health = "healthy" if session.get("healthy") else "unhealthy"
            rows.append(
                (
                    gateway["gateway_id"],
                    gateway.get("address"),
                    gateway["status"],
                    gateway.get("connections"),
                    health,
                    session.get("queued"),
                    session.get("inflight"),
                )
            )
        return _table(
            ("gateway", "address", "state", "connections", "stream", "queued", "in flight"),
            rows,
            "no gateway has reported",
        )

    async def lag() -> str:
        stages: list[GroupConsumer] = list(topology.stages)
        found = await asyncio.gather(*(stage.backlog() for stage in stages))
        rows = [
            (stage.stage, b["topic"], b.get("partitions"), b.get("depth"), b.get("lag"))
            for stage, topics in zip(stages, found, strict=True)
            for b in topics
        ]
        return _table(("stage", "topic", "partitions", "records held", "lag"), rows, "no stage")

    async def dead_letters() -> str:
        asker = next((s.kafka_consumer for s in topology.stages if s.kafka_consumer), None)
        if asker is None:
            return '<p class="muted">no stage is connected yet</p>'
        topics = [*dead_letter_topics, *([side.dead_letter_topic] if side else [])]
        partitions = await partitions_of(asker, topics)
        counts = await asyncio.gather(
            *(backlog(asker, t, partitions[t], group=None) for t in topics)
        )
        rows = [(c["topic"], c["depth"]) for c in counts]
        return _table(("dead-letter topic", "records"), rows, "none")

    async def large_groups() -> str:
        jobs = large_groups_json(topology)
        rows = [
            ("in progress" if not j["done"] else "finished", j["msg_id"], j.get("pages"))
            for j in [*jobs["in_progress"], *jobs["finished"]]
        ]
        return _table(("job", "msg_id", "pages"), rows, "no large-group job on this worker")

    async def tasks() -> str:
        if side is None:
            return '<p class="muted">the task side is off here (TASKS_ENABLED=false)</p>'
        counts = await side.statuses.counts()
        return _table(("state", "tasks"), sorted(counts.items()), "no task")

    @app.page("/status")
    class Status(View):
        async def get(self, request: web.Request) -> web.Response:
            parts = await asyncio.gather(
                _section("Workers", workers),
                _section("Gateways (as this worker sees them)", gateways),
                _section("Lag per topic", lag),
                _section("Dead letters", dead_letters),
                _section("Large-group jobs", large_groups),
                _section("Tasks", tasks),
            )
            app_id = html.escape(topology.settings.app_id)
            now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            page = (
                "<!doctype html><html><head><meta charset=utf-8>"
                '<meta http-equiv="refresh" content="5">'
                f"<title>{app_id}: status</title><style>{_STYLE}</style></head><body>"
                f'<h1>{app_id}</h1><p class="muted">{now}, answered by this worker'
                " (the page refreshes every 5 s)</p>" + "".join(parts) + "</body></html>"
            )
            return web.Response(text=page, content_type="text/html")
