"""The task API's OpenAPI 3.1 document, served at /api/v1/openapi.json.

Its schemas are generated from the models the views validate with (web/models.py), so a
limit or a field changes in one place; the paths and their answers are listed here.
tests/e2e/test_task_api.py sends real requests to a worker and checks every request and
answer against the document with openapi-core.
The payload of each task type is not written here: it is each processor's declaration's
own schema (tasks/payload.py), the one submit checks against, so the two cannot differ.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from faust.web import View
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from resonance_task.tasks.registry import Registry
from resonance_task.web import models
from resonance_task.web.models import BATCH_MAX

_SCHEMAS = "#/components/schemas/{model}"


def _model_schemas() -> dict[str, Any]:
    """Every model of web/models.py, and the models inside them, as components."""
    _, top = models_json_schema(
        [(model, "validation") for model in models.COMPONENTS], ref_template=_SCHEMAS
    )
    return dict(top.get("$defs", {}))


def _query(model: type[BaseModel]) -> list[dict[str, Any]]:
    """A query model's fields as OpenAPI query parameters (a missing one is None)."""
    schema = model.model_json_schema()
    params = []
    for name, prop in schema["properties"].items():
        # `X | None` is a parameter left out, not a null one: the X alone.
        choices = [c for c in prop.get("anyOf", ()) if c.get("type") != "null"]
        rest = {k: v for k, v in prop.items() if k not in ("anyOf", "title") and v is not None}
        plain = {**choices[0], **rest} if len(choices) == 1 else rest
        params.append({"name": name, "in": "query", "schema": plain})
    return params


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
        return {"TaskSubmit": _ref("TaskFields")}
    schemas: dict[str, Any] = {}
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
            "schemas": {**_model_schemas(), **_submit_schemas(registry)},
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
                    "parameters": _query(models.TaskQuery),
                    "responses": {"200": _json(_ref("TaskList"), "the tasks"), **_errors(400)},
                },
            },
            "/api/v1/tasks/batch": {
                "post": {
                    "summary": f"Submit up to {BATCH_MAX} tasks; each gets its own outcome",
                    "requestBody": {
                        "required": True,
                        **_json(_ref("BatchRequest"), "the tasks (each checked on its own)"),
                    },
                    "responses": {
                        "200": _json(
                            _ref("BatchAnswer"), "an outcome or an error per task, in order"
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
                        "202": _json(_ref("CancelRequested"), "running: asked to stop"),
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
                            _ref("ReplayRequest"), "which dead tasks; all of them when missing"
                        ),
                    },
                    "responses": {
                        "200": _json(_ref("ReplayAnswer"), "the tasks sent again"),
                        **_errors(400),
                    },
                },
            },
            "/api/v1/stats/workers": {
                "get": {
                    "summary": "Every live worker: its stages, partitions and running tasks",
                    "responses": {
                        "200": _json(_ref("WorkerList"), "the workers seen in the last seconds"),
                        **_errors(),
                    },
                },
            },
            "/api/v1/stats/queues": {
                "get": {
                    "summary": "Each task topic's depth and its consumer group's lag",
                    "responses": {
                        "200": _json(_ref("QueueList"), "the task topics"),
                        **_errors(),
                    },
                },
            },
            "/api/v1/stats/hourly": {
                "get": {
                    "summary": "The stats_report task's reports, newest first",
                    "parameters": _query(models.HourlyQuery),
                    "responses": {
                        "200": _json(_ref("ReportList"), "a report a period"),
                        **_errors(400),
                    },
                },
            },
        },
    }
