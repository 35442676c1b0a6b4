"""Processors by task_type: registered in code with @processor, or by plugin packages.

A processor is an object with `async run(task, ctx)` and, optionally, `async stop(task)`
(asked to give up a running task: cancel, shutdown). A plain `async def run(task, ctx)`
is one too. A plugin package adds processors without touching this code: it declares
them under the `resonance_task.processors` entry point group, name = task_type, value =
a processor object, class (instantiated without arguments) or function.

A processor may declare its payload (tasks/payload.py): `payload=` at registration, or a
`payload` attribute of the processor (how a plugin's entry point declares one). A task of
a type with a declared payload is accepted only with a payload that passes it, and its
processor finds the checked value as `ctx.payload`. Without one, any payload is taken.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks.errors import PermanentError
from resonance_task.tasks.payload import PayloadType, payload_type

__all__ = ["Context", "PermanentError", "Processor", "Registry", "processor", "registry"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "resonance_task.processors"


class Context(Protocol):
    """What a running task may ask of the worker."""

    task_id: str
    attempt: int
    # The payload as its type declares it (a model instance, or the checked JSON), checked
    # before the run; None for a type that declares none.
    payload: Any

    async def progress(self, percent: float, note: str = "") -> None: ...

    @property
    def cancelled(self) -> bool: ...


@runtime_checkable
class Processor(Protocol):
    async def run(self, task: Task, ctx: Context) -> Any: ...


RunFunction = Callable[[Task, Context], Awaitable[Any]]


class _FunctionProcessor:
    def __init__(self, run: RunFunction) -> None:
        self._run = run

    async def run(self, task: Task, ctx: Context) -> Any:
        return await self._run(task, ctx)


def as_processor(obj: Any) -> Processor:
    """A processor from what a registration gives: an instance, a class or a function."""
    if inspect.isclass(obj):
        obj = obj()
    if isinstance(obj, Processor):
        return obj
    if inspect.iscoroutinefunction(obj):
        return _FunctionProcessor(obj)
    raise TypeError(f"{obj!r} is not a processor: it needs `async def run(task, ctx)`")


class Registry:
    def __init__(self) -> None:
        self._processors: dict[str, Processor] = {}
        self._payloads: dict[str, PayloadType] = {}
        self.timeouts: dict[str, float] = {}

    def add(
        self, task_type: str, obj: Any, *, timeout: float | None = None, payload: Any = None
    ) -> Processor:
        """Register `obj` for `task_type`; `payload` (a pydantic model, a JSON Schema dict
        or a PayloadType) declares its payload, else the processor's `payload` attribute
        if it has one."""
        if not task_type:
            raise ValueError("a processor needs a task_type")
        if task_type in self._processors:
            raise ValueError(f"task_type {task_type!r} has a processor already")
        processor = as_processor(obj)
        if payload is None:
            payload = getattr(processor, "payload", getattr(obj, "payload", None))
        declared = payload_type(payload) if payload is not None else None
        self._processors[task_type] = processor
        if declared is not None:
            self._payloads[task_type] = declared
        if timeout is not None:
            self.timeouts[task_type] = timeout
        return processor

    def processor(
        self, task_type: str, *, timeout: float | None = None, payload: Any = None
    ) -> Callable[[Any], Any]:
        """Decorator: `@registry.processor("content_audit", payload=Audit)` on a class or
        an async def."""

        def register(obj: Any) -> Any:
            self.add(task_type, obj, timeout=timeout, payload=payload)
            return obj

        return register

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Add every installed plugin's processors; a broken plugin is refused loudly."""
        added = []
        for ep in entry_points(group=group):
            if ep.name in self._processors:
                raise ValueError(f"plugin {ep.value} registers {ep.name!r}, which is taken")
            self.add(ep.name, ep.load())
            added.append(ep.name)
            log.info("task processor %r from plugin %s", ep.name, ep.value)
        return added

    def get(self, task_type: str) -> Processor | None:
        return self._processors.get(task_type)

    def types(self) -> frozenset[str]:
        return frozenset(self._processors)

    def payload_types(self) -> dict[str, PayloadType]:
        """Each task type that declares its payload, and how."""
        return dict(self._payloads)

    def normalize(self, task: Task) -> Task:
        """`task` with its payload checked against its type's declaration and replaced by
        its normal form (defaults filled in); PayloadInvalid naming the field if wrong."""
        declared = self._payloads.get(task.task_type)
        if declared is not None:
            task.payload = declared.dump(declared.load(task.payload), task.payload)
        return task

    def load(self, task: Task) -> Any:
        """The task's payload checked as its type declares it (what `ctx.payload` is), or
        None for a type without a declaration; PayloadInvalid naming the field if wrong."""
        declared = self._payloads.get(task.task_type)
        return declared.load(task.payload) if declared is not None else None


# The app's registry: built-ins and @processor-decorated code register here.
registry = Registry()
processor = registry.processor
