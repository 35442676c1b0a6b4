"""Typed tasks: an envelope routed by task_type to registered processors (stages.py has
the topology). What a processor author imports is here."""

from resonance_task.tasks.payload import PayloadInvalid, PayloadType, payload_of
from resonance_task.tasks.registry import Context, PermanentError, Processor, processor

__all__ = [
    "Context",
    "PayloadInvalid",
    "PayloadType",
    "PermanentError",
    "Processor",
    "payload_of",
    "processor",
]
