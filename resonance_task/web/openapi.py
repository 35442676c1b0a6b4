"""The task API's OpenAPI 3.1 document, served at /api/v1/openapi.json.

Written by hand next to the views it describes (web/tasks.py, web/stats.py), from the
same constants, so a limit changes in one place; tests/e2e/test_task_api.py sends real
requests to a worker and checks every request and answer against it with openapi-core.
The payload of each task type is not written here: it is each processor's declaration's
own schema (tasks/payload.py), the one submit checks against, so the two cannot differ.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from faust.web import View

from resonance_task.tasks.envelope import MAX_ATTEMPTS_LIMIT, PRIORITIES, TIMEOUT_MS_LIMIT
from resonance_task.tasks.registry import Registry
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
        "payload": {
            "description": "any JSON value, handed to the processor as its JSON text; for a "
            "task type that declares its payload, what its TaskSubmit.<type> says"
        },
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
        "payload": {"description": "the payload as accepted, its type's defaults filled in"},
        "payload_b64": {
            "type": "string",
            "contentEncoding": "base64",
            "description": "the payload, when it is not JSON",
        },
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
        400: "a bad request: `field` names what is wrong (`payload.<path>` inside the payload)",
        401: "no or a wrong bearer token",
        404: "no such task",
        409: "the task is in a state that refuses this",
        413: "too many tasks in one batch",
        503: "a store is unavailable: try again (Retry-After)",
    }
    return {str(code): _json(_ref("Error"), why[code]) for code in (401, 503, *codes)}


_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _component(name: str) -> str:
    # What a components/schemas key may hold; task types are free-form.
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _hoisted(schema: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """A payload's schema as components: `name` itself and its $defs beside it, every
    local reference pointed at them (inside components, "#/$defs/X" would resolve
    against the document's root, where there is none)."""
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        found = schema.get(key)
        if isinstance(found, dict):
            defs.update({f"{key}/{k}": v for k, v in found.items()})
    own = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}

    def pointed(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: _pointed_ref(v, name, defs) if k == "$ref" and isinstance(v, str) else pointed(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [pointed(v) for v in value]
        return value

    out = {name: pointed(own)}
    for path, sub in defs.items():
        out[_def_name(name, path)] = pointed(sub)
    return out


def _def_name(name: str, path: str) -> str:
    return _component(f"{name}.{path.split('/', 1)[1]}")


def _pointed_ref(ref: str, name: str, defs: dict[str, Any]) -> str:
    if not ref.startswith("#"):
        return ref  # another document's: left as it is
    local = ref[2:]
    if local in defs:
        return f"#/components/schemas/{_def_name(name, local)}"
    return f"#/components/schemas/{name}{ref[1:]}"


def _submit_schemas(registry: Registry | None) -> dict[str, Any]:
    """TaskSubmit: one variant per task type, chosen by its task_type, each with its
    payload's schema; the types that declare no payload share one variant."""
    if registry is None or not registry.types():
        return {"TaskSubmit": _SUBMIT}
    schemas: dict[str, Any] = {"TaskFields": _SUBMIT}
    mapping: dict[str, str] = {}
    declared = registry.payload_types()
    for task_type, payload in sorted(declared.items()):
        name = _component(f"Payload.{task_type}")
        schemas.update(_hoisted(payload.json_schema(), name))
        variant = _component(f"TaskSubmit.{task_type}")
        schemas[variant] = {
            "allOf": [
                _ref("TaskFields"),
                {
                    "type": "object",
                    "properties": {"task_type": {"const": task_type}, "payload": _ref(name)},
                },
            ]
        }
        mapping[task_type] = f"#/components/schemas/{variant}"
    free = sorted(registry.types() - declared.keys())
    if free:
        schemas["TaskSubmit.any"] = {
            "allOf": [
                _ref("TaskFields"),
                {"type": "object", "properties": {"task_type": {"enum": free}}},
            ],
            "description": "a task type that declares no payload: any JSON value",
        }
        mapping.update({t: "#/components/schemas/TaskSubmit.any" for t in free})
    schemas["TaskSubmit"] = {
        "description": "A task; its payload as its task_type's processor declares it.",
        "oneOf": [{"$ref": ref} for ref in sorted(set(mapping.values()))],
        "discriminator": {"propertyName": "task_type", "mapping": mapping},
    }
    return schemas


def register(app: Any, registry: Registry | None = None) -> None:
    served = document(registry)

    @app.page("/api/v1/openapi.json")
    class Document(View):
        async def get(self, request: web.Request) -> web.Response:
            return web.json_response(served)


def document(registry: Registry | None = None) -> dict[str, Any]:
    """The document; with `registry`, the submit schema is per task type."""
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
                **_submit_schemas(registry),
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
                                        # Not TaskSubmit: a bad task is answered
                                        # in its result, the batch is not refused.
                                        "items": {"type": "object"},
                                        "description": "each a TaskSubmit",
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
