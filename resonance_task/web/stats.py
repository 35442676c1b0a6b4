"""GET /api/v1/stats/workers, /queues and /hourly: the cluster seen from outside.

workers: every live worker's own entry (pipeline/workers.py): its stages with their
partitions, and its task slots and waiting tasks per priority.
queues: each task topic's depth and its consumer group's lag, asked of the broker, so any
worker answers for all of them (pipeline/backlog.py).
hourly: the stats_report task's reports, newest first (tasks/reports.py), from this
worker's copy of the stats topic; `?limit=` (default 24, at most 1000).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from faust.web import View

from resonance_task.pipeline.backlog import backlog
from resonance_task.pipeline.workers import WorkerDirectory
from resonance_task.tasks.reports import StatsTable
from resonance_task.tasks.setup import TaskSide
from resonance_task.web import models


def register(
    app: Any,
    side: TaskSide | None,
    directory: WorkerDirectory,
    stats_table: StatsTable | None = None,
) -> None:
    """The queues view only where this worker runs the task side (TASKS_ENABLED)."""

    @app.page("/api/v1/stats/workers")
    class Workers(View):
        async def get(self, request: web.Request) -> web.Response:
            return web.json_response({"workers": await directory.workers()})

    if side is None:
        return
    tasks: TaskSide = side

    @app.page("/api/v1/stats/queues")
    class Queues(View):
        async def get(self, request: web.Request) -> web.Response:
            queues: list[dict[str, Any]] = []
            for stage in tasks.stages:
                queues += await stage.backlog()
            asker = next((s.kafka_consumer for s in tasks.stages if s.kafka_consumer), None)
            if asker is not None:
                dlq = tasks.dead_letter_topic
                queues.append(await backlog(asker, dlq, range(tasks.partitions), group=None))
            return web.json_response({"queues": queues})

    if stats_table is None:
        return
    table: StatsTable = stats_table

    @app.page("/api/v1/stats/hourly")
    class Hourly(View):
        async def get(self, request: web.Request) -> web.Response:
            query = models.HourlyQuery.model_validate(dict(request.query))  # a 400 if not
            return web.json_response({"reports": table.latest(query.limit)})
