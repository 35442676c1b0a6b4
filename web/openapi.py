"""The task API's OpenAPI 3.1 document, served at /api/v1/openapi.json.

Written by hand next to the views it describes (web/tasks.py, web/stats.py), from the
same constants, so a limit changes in one place; tests/web/test_openapi.py sends real
requests to a worker and checks every request and answer against it with openapi-core.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from faust.web import View

from resonance_task.tasks.envelope import MAX_ATTEMPTS_LIMIT, PRIORITIES, TIMEOUT_MS_LIMIT
from resonance_task.tasks.status import STATES

BATCH_MAX = 1000
LIST_LIMIT_MAX = 1000

_INT64 = {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "^-?[0-9]+$"}]}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "field": {"type": "string", "description": "the request field at fault"},
    },
}

_SUBMIT = {
    "type": "object",
    "required": ["task_type"],
    "description": "The proto3 JSON form of resonance.task.v1.Task, plus `payload` as any "
    "JSON value and `priority` by name.",
    "properties": {
        "task_id": {"type": "string", "description": "made up (uuid4 hex) when missing"},
        "task_type": {"type": "string", "description": "a registered processor's name"},
        "payload": {"description": "any JSON value, handed to the processor as its JSON text"},
        "payload_b64": {"type": "string", "contentEncoding": "base64"},
        "priority": {
            "oneOf": [
                {"type": "string", "enum": sorted(PRIORITIES)},
                {"type": "integer", "enum": sorted(PRIORITIES.values())},
            ]
        },
        "max_attempts": {"type": "integer", "minimum": 0, "maximum": MAX_ATTEMPTS_LIMIT},
        "not_before": {**_INT64, "description": "ms since epoch"},
        "timeout_ms": {"type": "integer", "minimum": 0, "maximum": TIMEOUT_MS_LIMIT},
        "idempotency_key": {"type": "string", "maxLength": 256},
        "trace_headers": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

_STATUS = {
    "type": "object",
    "required": ["task_id", "state", "progress"],
    "properties": {
        "task_id": {"type": "string"},
        "state": {"type": "string", "enum": list(STATES)},
        "task_type": {"type": "string"},
        "priority": {"type": "string", "enum": sorted(PRIORITIES)},
        "progress": {"type": "number", "minimum": 0, "maximum": 100},
        "progress_note": {"type": "string"},
        "result": {"description": "what the processor returned (JSON)"},
        "error": {"type": "string"},
        "idempotency_key": {"type": "string"},
        "worker": {"type": "string"},
        "cancel_requested": {"type": "boolean"},
        **{name: {"type": "integer", "minimum": 0} for name in ("attempt", "max_attempts")},
        **{
            name: {"type": "integer", "minimum": 0, "description": "ms since epoch"}
            for name in ("created_at", "updated_at", "started_at", "finished_at")
        },
    },
}

_OUTCOME = {
    "type": "object",
    "required": ["task_id", "state"],
    "properties": {
        "task_id": {"type": "string"},
        "state": {"type": "string", "enum": list(STATES)},
        "duplicate_of": {
            "type": "string",
            "description": "the task that holds this idempotency key: this one never runs",
        },
        "existed": {"type": "boolean", "description": "this task id was submitted before"},
    },
}

_BATCH_RESULT = {
    "type": "object",
    "required": ["index"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "task_id": {"type": "string"},
        "state": {"type": "string", "enum": list(STATES)},
        "duplicate_of": {"type": "string"},
        "existed": {"type": "boolean"},
        "error": {"type": "string"},
        "field": {"type": "string"},
    },
}

_WORKER = {
    "type": "object",
    "required": ["worker", "seen_at", "stages"],
    "properties": {
        "worker": {"type": "string"},
        "web_url": {"type": "string"},
        "seen_at": {"type": "integer"},
        "started_at": {"type": "integer"},
        "stages": {"type": "object", "additionalProperties": {"type": "object"}},
        "tasks": {"type": "object"},
    },
}

_QUEUE = {
    "type": "object",
    "required": ["topic", "depth"],
    "properties": {
        "topic": {"type": "string"},
        "group": {"type": ["string", "null"]},
        "depth": {"type": "integer", "minimum": 0, "description": "records held"},
        "lag": {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "records its group has still to read",
        },
        "partitions": {"type": "integer", "minimum": 0},
    },
}

_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_REPORT = {
    "type": "object",
    "required": ["period", "period_start", "period_end", "from", "to", "records", "tasks"],
    "properties": {
        "period": {"type": "string", "description": "the period's start, ISO 8601 UTC"},
        "period_start": {"type": "integer", "description": "ms since the epoch"},
        "period_end": {"type": "integer"},
        "from": {
            "type": ["integer", "null"],
            "description": "the span counted: from the report before (null: the first)",
        },
        "to": {"type": "integer"},
        "records": {**_COUNTS, "description": "records added to each topic"},
        "tasks": {**_COUNTS, "description": "tasks that reached each final state"},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    why = {
        400: "a bad request: `field` names what is wrong",
        401: "no or a wrong bearer token",
        404: "no such task",
        409: "the task is in a state that refuses this",
        413: "too many tasks in one batch",
        503: "a store is unavailable: try again (Retry-After)",
    }
    return {str(code): _json(_ref("Error"), why[code]) for code in (401, 503, *codes)}


_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}


def register(app: Any) -> None:
    served = document()

    @app.page("/api/v1/openapi.json")
    class Document(View):
        async def get(self, request: web.Request) -> web.Response:
            return web.json_response(served)


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Resonance Task: typed tasks",
            "version": "1",
            "description": "Submit typed tasks, follow their status, cancel, retry and "
            "replay them. Any worker answers for any task.",
        },
        "components": {
            "schemas": {
                "Error": _ERROR,
                "TaskSubmit": _SUBMIT,
                "TaskStatus": _STATUS,
                "SubmitOutcome": _OUTCOME,
                "Worker": _WORKER,
                "Queue": _QUEUE,
                "Report": _REPORT,
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/v1/tasks": {
                "post": {
                    "summary": "Submit one task",
                    "requestBody": {"required": True, **_json(_ref("TaskSubmit"), "a task")},
                    "responses": {
                        "201": _json(_ref("SubmitOutcome"), "queued"),
                        "200": _json(_ref("SubmitOutcome"), "a duplicate idempotency key"),
                        **_errors(400, 409),
                    },
                },
                "get": {
                    "summary": "Tasks, most recently changed first, across workers",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"type": "string", "enum": list(STATES)},
                        },
                        {"name": "task_type", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": LIST_LIMIT_MAX,
                                "default": 100,
                            },
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["tasks", "count"],
                                "properties": {
                                    "tasks": {"type": "array", "items": _ref("TaskStatus")},
                                    "count": {"type": "integer", "minimum": 0},
                                },
                            },
                            "the tasks",
                        ),
                        **_errors(400),
                    },
                },
            },
            "/api/v1/tasks/batch": {
                "post": {
                    "summary": f"Submit up to {BATCH_MAX} tasks; each gets its own outcome",
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "required": ["tasks"],
                                "properties": {
                                    "tasks": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {"type": "object"},
                                    }
                                },
                            },
                            "the tasks (each checked on its own)",
                        ),
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["results"],
                                "properties": {
                                    "results": {"type": "array", "items": _BATCH_RESULT}
                                },
                            },
                            "an outcome or an error per task, in order",
                        ),
                        **_errors(400, 413),
                    },
                },
            },
            "/api/v1/tasks/{task_id}": {
                "parameters": [_TASK_ID],
                "get": {
                    "summary": "A task's status",
                    "responses": {"200": _json(_ref("TaskStatus"), "its status"), **_errors(404)},
                },
                "delete": {
                    "summary": "Cancel: a queued task never runs, a running one is told to stop",
                    "responses": {
                        "200": _json(_ref("SubmitOutcome"), "cancelled"),
                        "202": _json(
                            {
                                "type": "object",
                                "required": ["task_id", "state", "cancel_requested"],
                                "properties": {
                                    "task_id": {"type": "string"},
                                    "state": {"const": "running"},
                                    "cancel_requested": {"const": True},
                                },
                            },
                            "running: asked to stop",
                        ),
                        **_errors(404, 409),
                    },
                },
            },
            "/api/v1/tasks/{task_id}/retry": {
                "parameters": [_TASK_ID],
                "post": {
                    "summary": "Run a failed, dead or cancelled task again, attempts from zero",
                    "responses": {
                        "202": _json(_ref("SubmitOutcome"), "back in the first retry stage"),
                        **_errors(404, 409),
                    },
                },
            },
            "/api/v1/tasks/dlq/replay": {
                "post": {
                    "summary": "Dead tasks (all, or those named) back into the first retry stage",
                    "requestBody": {
                        "required": False,
                        **_json(
                            {
                                "type": "object",
                                "properties": {
                                    "task_ids": {"type": "array", "items": {"type": "string"}}
                                },
                            },
                            "which dead tasks; all of them when missing",
                        ),
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["replayed", "count"],
                                "properties": {
                                    "replayed": {"type": "array", "items": {"type": "string"}},
                                    "count": {"type": "integer", "minimum": 0},
                                },
                            },
                            "the tasks sent again",
                        ),
                        **_errors(400),
                    },
                },
            },
            "/api/v1/stats/workers": {
                "get": {
                    "summary": "Every live worker: its stages, partitions and running tasks",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["workers"],
                                "properties": {
                                    "workers": {"type": "array", "items": _ref("Worker")}
                                },
                            },
                            "the workers seen in the last seconds",
                        ),
                        **_errors(),
                    },
                },
            },
            "/api/v1/stats/queues": {
                "get": {
                    "summary": "Each task topic's depth and its consumer group's lag",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["queues"],
                                "properties": {"queues": {"type": "array", "items": _ref("Queue")}},
                            },
                            "the task topics",
                        ),
                        **_errors(),
                    },
                },
            },
            "/api/v1/stats/hourly": {
                "get": {
                    "summary": "The stats_report task's reports, newest first",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        }
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["reports"],
                                "properties": {
                                    "reports": {"type": "array", "items": _ref("Report")}
                                },
                            },
                            "a report a period",
                        ),
                        **_errors(400),
                    },
                },
            },
        },
    }
