"""A processor's declared payload: how it is declared, what it refuses and names, what it
fills in, and the OpenAPI document built from the same declarations."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest
from openapi_core.validation.request.exceptions import InvalidRequestBody
from pydantic import BaseModel, ConfigDict

from resonance_task.pipeline.limits import Limits
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush, OfflinePushBatch
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks import PayloadInvalid, PayloadType, builtins, envelope, payload_of
from resonance_task.tasks.periodic import Periodic, last_period
from resonance_task.tasks.registry import Registry
from resonance_task.tasks.reports import StatsReportPayload
from resonance_task.web.openapi import document

HOUR_MS = 3_600_000


async def _run(task: Task, ctx: Any) -> None:
    pass


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    x: int
    y: int = 0


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    points: list[Point]


class Report:
    payload = StatsReportPayload.every(600)

    async def run(self, task: Task, ctx: Any) -> None:
        pass


COUNTED = {
    "type": "object",
    "required": ["n"],
    "properties": {
        "n": {"type": "integer", "minimum": 1},
        "mode": {"type": "string", "default": "fast"},
    },
    "additionalProperties": False,
}


def _registry() -> Registry:
    """Every way of declaring, and the built-ins as a worker registers them."""
    registry = Registry()
    builtins.register(
        registry,
        audit_url="http://moderation.invalid",
        send_verdict=_run,  # type: ignore[arg-type]
        offline_pusher=object(),
        inbox_archive=object(),
        stats_report=Report(),
    )
    registry.add("shape", _run, payload=Shape)
    registry.add("counted", _run, payload=COUNTED)
    registry.processor("free")(_run)
    return registry


def _normalized(registry: Registry, task_type: str, payload: Any) -> Any:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    task = registry.normalize(Task(task_id="t", task_type=task_type, payload=raw))
    return json.loads(task.payload)


def _refused(registry: Registry, task_type: str, payload: Any) -> PayloadInvalid:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(PayloadInvalid) as refused:
        registry.normalize(Task(task_id="t", task_type=task_type, payload=raw))
    return refused.value


def test_a_payload_is_declared_at_registration_or_on_the_processor() -> None:
    registry = _registry()
    declared = registry.payload_types()
    assert {"stats_report", "content_audit", "inbox_archive", "offline_push"} <= set(declared)
    assert {"shape", "counted"} <= set(declared)
    assert "noop" not in declared and "free" not in declared
    # Without a declaration, any payload is taken as it is.
    task = Task(task_id="t", task_type="free", payload=b"\xff not json")
    assert registry.normalize(task).payload == b"\xff not json"
    assert registry.load(task) is None


def test_a_declaration_that_is_none_is_refused_at_registration() -> None:
    registry = Registry()
    with pytest.raises(TypeError, match="pydantic model"):
        registry.add("x", _run, payload=42)
    from jsonschema.exceptions import SchemaError

    with pytest.raises(SchemaError):
        registry.add("y", _run, payload={"type": "no-such-type"})
    assert registry.types() == frozenset()  # neither was registered


def test_stats_report_defaults_to_the_last_whole_period() -> None:
    registry = _registry()
    before = last_period(time.time(), 600_000)
    filled = _normalized(registry, "stats_report", {})
    assert (filled["period_start"], filled["period_end"]) in (
        before,
        last_period(time.time(), 600_000),  # a period boundary passed meanwhile
    )
    assert filled["period_end"] - filled["period_start"] == 600_000
    # One edge given: the other is one report interval away.
    assert _normalized(registry, "stats_report", {"period_end": 1_200_000}) == {
        "period_start": 600_000,
        "period_end": 1_200_000,
    }
    assert _normalized(registry, "stats_report", {"period_start": 600_000}) == {
        "period_start": 600_000,
        "period_end": 1_200_000,
    }
    # What the leader submits passes as it is.
    periodic = Periodic("stats_report", 600).task_for(time.time())
    assert json.loads(registry.normalize(periodic).payload) == json.loads(
        Periodic("stats_report", 600).task_for(time.time()).payload
    )


@pytest.mark.parametrize(
    ("payload", "field", "says"),
    [
        ({"period_start": 10, "period_end": 5}, "payload.period_end", "after period_start"),
        ({"period_start": 10, "period_end": 10}, "payload.period_end", "after period_start"),
        ({"period_end": "yesterday"}, "payload.period_end", "integer"),
        ({"period_end": "1796310000000"}, "payload.period_end", "integer"),
        ({"period_start": -1}, "payload.period_start", "greater than or equal to 0"),
        ({"period_start": True}, "payload.period_start", "integer"),
        ({"period": 5}, "payload.period", "not permitted"),
        ([1, 2], "payload", "object"),
        (b"{not json", "payload", "JSON"),
    ],
)
def test_stats_report_refusals_name_the_field(payload: Any, field: str, says: str) -> None:
    refused = _refused(_registry(), "stats_report", payload)
    assert refused.field == field and says in refused.detail, refused
    assert str(refused).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("task_type", "payload", "field"),
    [
        ("content_audit", {"content_id": "c-1"}, "payload.content"),
        ("content_audit", {"content_id": "", "content": "x"}, "payload.content_id"),
        ("content_audit", {"content_id": 7, "content": "x"}, "payload.content_id"),
        ("inbox_archive", {"users": "u1"}, "payload.users"),
        ("inbox_archive", {"users": ["u1", ""]}, "payload.users[1]"),
        ("inbox_archive", {"user": ["u1"]}, "payload.user"),  # not "every inbox"
        ("offline_push", {"users": []}, "payload.users"),
        ("offline_push", {"user": ["u1"]}, "payload.user"),
        ("offline_push", b"", "payload.users"),
        ("offline_push", {"users": ["u1"], "message": {"msg_id": "x"}}, "payload.message"),
        (
            "offline_push",
            OfflinePushBatch(pushes=[OfflinePush(reason="r")]).SerializeToString(),
            "payload.pushes",
        ),
        ("shape", {"name": "s", "points": [{"x": 1}, {"y": 2}]}, "payload.points[1].x"),
        ("counted", {}, "payload.n"),
        ("counted", {"n": 0}, "payload.n"),
        ("counted", {"n": 1, "extra": 2}, "payload.extra"),
        ("counted", b"[]", "payload"),
    ],
)
def test_each_declaration_refuses_naming_the_field(
    task_type: str, payload: Any, field: str
) -> None:
    assert _refused(_registry(), task_type, payload).field == field


def test_what_passes_is_stored_normalized() -> None:
    registry = _registry()
    audit = {"content_id": "c-1", "content": "hi", "sender": "u1"}
    assert _normalized(registry, "content_audit", audit) == audit  # the rest passed along
    assert _normalized(registry, "inbox_archive", b"") == {"users": None}
    assert _normalized(registry, "counted", {"n": 2}) == {"n": 2, "mode": "fast"}
    assert _normalized(registry, "shape", {"name": "s", "points": [{"x": 1}]}) == {
        "name": "s",
        "points": [{"x": 1, "y": 0}],
    }
    # offline_push keeps its bytes: proto3 JSON or a batch's protobuf, as given.
    push = OfflinePush(users=["u1"], message=PushMessage(msg_id=7))
    batch = OfflinePushBatch(pushes=[push]).SerializeToString()
    task = registry.normalize(Task(task_id="t", task_type="offline_push", payload=batch))
    assert task.payload == batch and list(registry.load(task)[0].users) == ["u1"]


def test_the_envelope_check_answers_a_payload_refusal_as_a_task_error() -> None:
    registry = _registry()
    task = envelope.from_json(
        {"task_type": "stats_report", "payload": {"period_start": 9, "period_end": 1}}
    )
    with pytest.raises(envelope.TaskError) as refused:
        envelope.check_payload(task, registry, Limits())
    assert refused.value.reason == "invalid_payload"
    assert refused.value.field == "payload.period_end"
    assert str(refused.value) == "payload.period_end: must be after period_start (9)"


def test_a_processor_gets_the_checked_model() -> None:
    registry = _registry()
    task = Task(task_id="t", task_type="shape", payload=b'{"name": "s", "points": []}')
    loaded = registry.load(task)

    class Ctx:
        payload = loaded

    assert payload_of(task, Ctx(), Shape) is loaded  # what the runner checked: not again
    # Outside a runner (no ctx.payload), checked there and then.
    assert payload_of(task, object(), Shape) == loaded
    with pytest.raises(PayloadInvalid):
        payload_of(Task(payload=b"{}"), object(), Shape)


def test_a_payload_type_of_its_own_is_taken_as_it_is() -> None:
    class Even(PayloadType):
        def load(self, raw: bytes) -> int:
            value = int(raw or b"0")
            if value % 2:
                raise PayloadInvalid([], "an even number")
            return value

        def json_schema(self) -> dict[str, Any]:
            return {"type": "integer", "multipleOf": 2}

    registry = Registry()
    registry.add("even", _run, payload=Even())
    assert registry.load(Task(task_type="even", payload=b"4")) == 4
    with pytest.raises(PayloadInvalid, match="payload: an even number"):
        registry.normalize(Task(task_type="even", payload=b"3"))


def _request(body: Any) -> MockRequest:
    return MockRequest(
        "http://worker",
        "post",
        "/api/v1/tasks",
        data=json.dumps(body).encode(),
        content_type="application/json",
    )


def test_the_openapi_document_shows_each_task_types_payload() -> None:
    registry = _registry()
    doc = document(registry)
    spec = OpenAPI.from_dict(doc)  # the document itself is valid
    schemas = doc["components"]["schemas"]
    assert schemas["Payload.stats_report"]["properties"].keys() == {"period_start", "period_end"}
    assert "required" not in schemas["Payload.stats_report"]  # both have a default
    assert schemas["Payload.content_audit"]["required"] == ["content_id", "content"]
    assert schemas["Payload.counted"] == COUNTED
    assert schemas["Payload.offline_push"]["required"] == ["users"]
    # A nested model's $defs become components of their own, referenced from there.
    assert schemas["Payload.shape"]["properties"]["points"]["items"] == {
        "$ref": "#/components/schemas/Payload.shape.Point"
    }
    assert "x" in schemas["Payload.shape.Point"]["properties"]
    mapping = schemas["TaskSubmit"]["discriminator"]["mapping"]
    assert mapping["stats_report"] == "#/components/schemas/TaskSubmit.stats_report"
    assert mapping["noop"] == mapping["free"] == "#/components/schemas/TaskSubmit.any"
    assert set(mapping) == registry.types()

    # The document refuses what submit refuses, and takes what it takes.
    for good in (
        {"task_type": "stats_report", "payload": {}},
        {"task_type": "shape", "payload": {"name": "s", "points": [{"x": 1}]}},
        {"task_type": "noop", "payload": [1, "anything"]},
    ):
        spec.validate_request(_request(good))
    for bad in (
        {"task_type": "stats_report", "payload": {"period_end": "yesterday"}},
        {"task_type": "shape", "payload": {"name": "s", "points": [{"y": 1}]}},
        {"task_type": "content_audit", "payload": {"content_id": "c"}},
        {"task_type": "no_such_type"},
    ):
        with pytest.raises(InvalidRequestBody):
            spec.validate_request(_request(bad))


def test_without_tasks_the_document_has_the_plain_submit_schema() -> None:
    OpenAPI.from_dict(document(None))
    assert "discriminator" not in document(None)["components"]["schemas"]["TaskSubmit"]
