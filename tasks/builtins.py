"""The processors every worker has.

`noop` does nothing and succeeds: a probe of the task path end to end (submit, status,
a slot, the result), and what bench/ measures the path's own cost with.
"""

from __future__ import annotations

from typing import Any

from proto.resonance.task.v1.task_pb2 import Task
from tasks.registry import Context, Registry


async def noop(task: Task, ctx: Context) -> dict[str, Any]:
    return {"ok": True}


def register(registry: Registry) -> None:
    registry.add("noop", noop, timeout=5.0)
