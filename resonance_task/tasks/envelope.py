"""The task envelope as it comes in: protobuf or JSON, checked before anything runs it.

Producers we do not control write the task topic, so a record is refused, with a reason
the dead letter and the API's 4xx both carry, when its id is unusable, its type has no
processor, or its numbers make no sense. A refused task never reaches a processor.
`check_payload` then holds the payload to its type's declaration (tasks/payload.py): a
step of its own, because a task refused for its payload has a usable id and type, so the
intake can give it a status (dead) where a refused envelope has none to give.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from google.protobuf.json_format import ParseDict
from google.protobuf.json_format import ParseError as JsonParseError

from resonance_task.pipeline.dlq import InvalidRecord
from resonance_task.pipeline.limits import Limits
from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task
from resonance_task.tasks.payload import PayloadInvalid, proto_json_field

if TYPE_CHECKING:
    from resonance_task.tasks.registry import Registry

PRIORITIES: dict[str, int] = {
    "high": Priority.PRIORITY_HIGH,
    "normal": Priority.PRIORITY_NORMAL,
    "low": Priority.PRIORITY_LOW,
}
PRIORITY_NAMES: dict[int, str] = {value: name for name, value in PRIORITIES.items()}
MAX_ATTEMPTS_LIMIT = 100
TIMEOUT_MS_LIMIT = 24 * 3600 * 1000


class TaskError(InvalidRecord):
    """A task refused at the door; `field` names what is wrong (the API's 4xx says it)."""

    def __init__(self, reason: str, field: str, detail: str) -> None:
        super().__init__(reason, f"{field}: {detail}")
        self.field = field


def priority_name(priority: int) -> str:
    return PRIORITY_NAMES.get(priority, "normal")


def from_json(body: Any) -> Task:
    """A task from its JSON form: the proto3 JSON mapping, plus what people write by hand.

    `payload` may be any JSON value (kept as its JSON text) or, as the mapping says,
    base64 under `payload_b64`; `priority` may be "high"/"normal"/"low".
    """
    if not isinstance(body, dict):
        raise TaskError("invalid_task", "body", "a task is a JSON object")
    body = dict(body)
    payload = body.pop("payload", None)
    payload_b64 = body.pop("payload_b64", None)
    priority = body.pop("priority", None)
    task = Task()
    try:
        ParseDict(body, task)
    except JsonParseError as exc:
        raise TaskError("invalid_task", _field_of(str(exc)), str(exc)) from None
    if payload is not None and payload_b64 is not None:
        raise TaskError("invalid_task", "payload", "give payload or payload_b64, not both")
    if payload_b64 is not None:
        try:
            ParseDict({"payload": payload_b64}, task, ignore_unknown_fields=False)
        except JsonParseError as exc:
            raise TaskError("invalid_task", "payload_b64", str(exc)) from None
    elif payload is not None:
        task.payload = json.dumps(payload, separators=(",", ":")).encode()
    if priority is not None:
        task.priority = Priority.ValueType(_priority(priority))
    return task


def _priority(value: Any) -> int:
    if isinstance(value, str):
        name = value.lower().removeprefix("priority_")
        if name in PRIORITIES:
            return PRIORITIES[name]
    elif isinstance(value, int) and not isinstance(value, bool) and value in PRIORITY_NAMES:
        return value
    raise TaskError("invalid_task", "priority", f"one of high, normal, low; got {value!r}")


def _field_of(message: str) -> str:
    return proto_json_field(message) or "body"


def decode(value: bytes) -> Task:
    """A record's value: JSON when it looks like a JSON object, protobuf otherwise."""
    stripped = value.lstrip()
    if stripped.startswith(b"{"):
        try:
            body = json.loads(stripped)
        except (UnicodeError, ValueError) as exc:
            raise TaskError("decode_error", "body", f"not JSON: {exc}") from None
        return from_json(body)
    return Task.FromString(value)


def check(task: Task, known_types: frozenset[str], limits: Limits) -> Task:
    """`task` if it can run, with its defaults filled in; else TaskError naming the field."""
    if not task.task_id:
        task.task_id = uuid.uuid4().hex
    problem = limits.id_problem(task.task_id)
    if problem:
        raise TaskError("invalid_task", "task_id", problem)
    if not task.task_type:
        raise TaskError("invalid_task", "task_type", "required")
    if task.task_type not in known_types:
        raise TaskError(
            "unknown_task_type",
            "task_type",
            f"no processor for {task.task_type!r}; known: {', '.join(sorted(known_types))}",
        )
    if task.priority not in PRIORITY_NAMES:
        raise TaskError("invalid_task", "priority", f"unknown priority {task.priority}")
    if not 0 <= task.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise TaskError("invalid_task", "max_attempts", f"0..{MAX_ATTEMPTS_LIMIT}")
    if task.attempt < 0:
        raise TaskError("invalid_task", "attempt", "not negative")
    if not 0 <= task.timeout_ms <= TIMEOUT_MS_LIMIT:
        raise TaskError("invalid_task", "timeout_ms", f"0..{TIMEOUT_MS_LIMIT}")
    if task.not_before < 0:
        raise TaskError("invalid_task", "not_before", "ms since epoch, not negative")
    if len(task.payload) > limits.content_max_bytes:
        raise TaskError(
            "too_large", "payload", f"{len(task.payload)} bytes > {limits.content_max_bytes}"
        )
    if task.idempotency_key and len(task.idempotency_key.encode()) > 256:
        raise TaskError("invalid_task", "idempotency_key", "at most 256 bytes")
    if not task.submitted_at:
        task.submitted_at = int(time.time() * 1000)
    return task


def check_payload(task: Task, registry: Registry, limits: Limits) -> Task:
    """`task` (envelope checked) with its payload held to its type's declaration and
    replaced by its normal form; TaskError ("invalid_payload", field `payload.<path>`)."""
    try:
        registry.normalize(task)
    except PayloadInvalid as exc:
        raise TaskError("invalid_payload", exc.field, exc.detail) from None
    if len(task.payload) > limits.content_max_bytes:  # defaults filled in may add bytes
        raise TaskError(
            "too_large", "payload", f"{len(task.payload)} bytes > {limits.content_max_bytes}"
        )
    return task
