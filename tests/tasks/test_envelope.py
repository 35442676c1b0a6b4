"""The task envelope as producers write it: protobuf, JSON by hand, and what is refused."""

from __future__ import annotations

import json

import pytest

from resonance_task.pipeline.limits import Limits
from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task
from resonance_task.tasks import envelope

KNOWN = frozenset({"noop", "content_audit"})


def _checked(value: bytes) -> Task:
    return envelope.check(envelope.decode(value), KNOWN, Limits())


def test_protobuf_and_json_give_the_same_task() -> None:
    proto = Task(task_id="t1", task_type="noop", priority=Priority.PRIORITY_HIGH, payload=b"{}")
    as_json = json.dumps(
        {"task_id": "t1", "taskType": "noop", "priority": "high", "payload": {}}
    ).encode()
    a, b = _checked(proto.SerializeToString()), _checked(as_json)
    a.submitted_at = b.submitted_at = 0
    assert a == b


def test_defaults_are_filled_in() -> None:
    task = _checked(b'{"task_type": "noop"}')
    assert len(task.task_id) == 32 and task.submitted_at > 0
    assert task.priority == Priority.PRIORITY_NORMAL


@pytest.mark.parametrize(
    ("body", "reason", "field"),
    [
        ({"task_type": "nope"}, "unknown_task_type", "task_type"),
        ({}, "invalid_task", "task_type"),
        ({"task_type": "noop", "priority": "urgent"}, "invalid_task", "priority"),
        ({"task_type": "noop", "priority": 7}, "invalid_task", "priority"),
        ({"task_type": "noop", "max_attempts": 1000}, "invalid_task", "max_attempts"),
        ({"task_type": "noop", "timeout_ms": -5}, "invalid_task", "timeout_ms"),
        ({"task_type": "noop", "task_id": "a\\u0000b"}, "invalid_task", "task_id"),
        ({"task_type": "noop", "task_id": "{x}"}, "invalid_task", "task_id"),
        ({"task_type": "noop", "payload": "x" * 300_000}, "too_large", "payload"),
        ({"task_type": "noop", "bogus": 1}, "invalid_task", "bogus"),
        ({"task_type": "noop", "payload": 1, "payload_b64": "AA=="}, "invalid_task", "payload"),
    ],
)
def test_refused_with_the_field_named(body: dict[str, object], reason: str, field: str) -> None:
    raw = json.dumps(body).replace("\\\\u0000", "\\u0000").encode()
    with pytest.raises(envelope.TaskError) as refused:
        _checked(raw)
    assert (refused.value.reason, refused.value.field) == (reason, field)


def test_undecodable_bytes_are_refused() -> None:
    with pytest.raises(envelope.TaskError) as refused:
        _checked(b"{not json")
    assert refused.value.reason == "decode_error"
