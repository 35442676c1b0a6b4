"""The typed-task REST API, served from the worker's Faust web server (JSON in and out).

    POST   /api/v1/tasks               submit one task            201; 200 if a duplicate
    POST   /api/v1/tasks/batch         submit up to 1000          200, an outcome per task
    GET    /api/v1/tasks/{id}          its status                 200; 404 if never submitted
    GET    /api/v1/tasks?status=&task_type=&limit=                newest first, every worker's
    DELETE /api/v1/tasks/{id}          cancel                     200 cancelled; 202 running
    POST   /api/v1/tasks/{id}/retry    run a failed, dead or cancelled task again    202
    POST   /api/v1/tasks/dlq/replay    dead tasks back into the first retry stage    200

Any worker answers for any task: statuses are in Redis (tasks/status.py says why), so a
lookup is one read, never a scan and never a hop to another worker. Behind the same
bearer token as every other view (web/auth.py). A bad request is a 4xx whose JSON names
the field; a task_type with no processor, or a payload its processor's declaration
refuses (`payload.<path>`), is refused here, not failed later.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from faust.web import View

from resonance_task.pipeline.limits import Limits
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks import envelope
from resonance_task.tasks.setup import TaskSide
from resonance_task.tasks.stages import run_again, submit
from resonance_task.web import models
from resonance_task.web.models import BATCH_MAX, LIST_LIMIT_MAX


def _error(status: int, field: str, message: str) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"the body is not JSON: {exc}", "field": "body"}),
            content_type="application/json",
        ) from None


def _outcome(task: Task, kind: str, value: str) -> dict[str, Any]:
    if kind == "duplicate":
        return {"task_id": task.task_id, "state": "cancelled", "duplicate_of": value}
    if kind == "exists":
        return {"task_id": task.task_id, "state": value, "existed": True}
    return {"task_id": task.task_id, "state": "queued"}


def register(app: Any, side: TaskSide, limits: Limits) -> None:
    statuses = side.statuses

    def checked(body: Any) -> Task:
        task = envelope.check(envelope.from_json(body), side.registry.types(), limits)
        return envelope.check_payload(task, side.registry, limits)

    async def again(task_id: str, allowed: str) -> str | None:
        return await run_again(task_id, allowed, statuses, side.first_retry)

    # Registered before /api/v1/tasks/{task_id}: aiohttp matches in order.
    @app.page("/api/v1/tasks/batch")
    class TaskBatch(View):
        async def post(self, request: web.Request) -> web.Response:
            # A body the model refuses is a 400 naming the field (web/errors.py).
            items = models.BatchRequest.model_validate(await _body(request)).tasks
            if len(items) > BATCH_MAX:
                return _error(413, "tasks", f"at most {BATCH_MAX} tasks a batch")
            results: list[dict[str, Any]] = []
            good: list[tuple[int, Task]] = []
            for i, item in enumerate(items):
                try:
                    good.append((i, checked(item)))
                except envelope.TaskError as exc:
                    results.append({"index": i, "error": str(exc), "field": exc.field})
            outcomes = await submit([t for _, t in good], statuses, side.lanes, "api")
            for (i, task), (kind, value) in zip(good, outcomes, strict=True):
                results.append({"index": i, **_outcome(task, kind, value)})
            results.sort(key=lambda r: r["index"])
            return web.json_response({"results": results})

    @app.page("/api/v1/tasks/dlq/replay")
    class DlqReplay(View):
        async def post(self, request: web.Request) -> web.Response:
            body = await _body(request) if request.can_read_body else {}
            ids = models.ReplayRequest.model_validate(body).task_ids
            if ids is None:
                dead = await statuses.list(state="dead", task_type=None, limit=LIST_LIMIT_MAX)
                ids = [status["task_id"] for status in dead]
            replayed = [task_id for task_id in ids if await again(task_id, "dead") is None]
            return web.json_response({"replayed": replayed, "count": len(replayed)})

    @app.page("/api/v1/tasks")
    class Tasks(View):
        async def post(self, request: web.Request) -> web.Response:
            try:
                task = checked(await _body(request))
            except envelope.TaskError as exc:
                return _error(400, exc.field, str(exc))
            ((kind, value),) = await submit([task], statuses, side.lanes, "api")
            if kind == "exists":
                return _error(409, "task_id", f"task {task.task_id} exists ({value})")
            status = 200 if kind == "duplicate" else 201
            return web.json_response(_outcome(task, kind, value), status=status)

        async def get(self, request: web.Request) -> web.Response:
            # An empty value is the parameter left out (`?status=&task_type=`).
            query = models.TaskQuery.model_validate({k: v for k, v in request.query.items() if v})
            found = await statuses.list(
                state=query.status, task_type=query.task_type, limit=query.limit
            )
            return web.json_response({"tasks": found, "count": len(found)})

    @app.page("/api/v1/tasks/{task_id}/retry")
    class TaskRetry(View):
        async def post(self, request: web.Request, task_id: str) -> web.Response:
            refused = await again(task_id, "failed,dead,cancelled")
            if refused == "missing":
                return _error(404, "task_id", f"no task {task_id}")
            if refused is not None:
                return _error(409, "task_id", f"task {task_id} is {refused}: nothing to retry")
            return web.json_response({"task_id": task_id, "state": "retrying"}, status=202)

    @app.page("/api/v1/tasks/{task_id}")
    class TaskStatus(View):
        async def get(self, request: web.Request, task_id: str) -> web.Response:
            status = await statuses.get(task_id)
            if status is None:
                return _error(404, "task_id", f"no task {task_id}")
            return web.json_response(status)

        async def delete(self, request: web.Request, task_id: str) -> web.Response:
            outcome, before = await statuses.request_cancel(task_id)
            if outcome == "missing":
                return _error(404, "task_id", f"no task {task_id}")
            if outcome == "cancelled":
                return web.json_response({"task_id": task_id, "state": "cancelled"})
            if outcome == "cancelling":
                body = {"task_id": task_id, "state": "running", "cancel_requested": True}
                return web.json_response(body, status=202)
            return _error(409, "task_id", f"task {task_id} is {before}: it cannot be cancelled")
