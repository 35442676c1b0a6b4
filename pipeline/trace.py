"""W3C trace context as it travels with a message: Kafka headers, the event, gRPC metadata.

Keys are lower-cased (HTTP and Kafka headers are case-insensitive; gRPC metadata keys
must be lower case, and grpc refuses a call with any other) and values that are not
valid W3C are dropped: a bad header would fail every push to a gateway, for a trace
nobody can follow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

TRACE_HEADERS = ("traceparent", "tracestate")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE_MAX = 512  # W3C: at most 32 list members; propagators cut longer ones anyway


def context_from(
    kafka_headers: Sequence[tuple[str, bytes]] | None, *overrides: Mapping[str, str]
) -> dict[str, str]:
    """The valid W3C context in a Kafka record's headers, overridden by each mapping in
    turn (e.g. the event's own trace_headers); names lower-cased, anything else dropped."""
    context: dict[str, str] = {}
    for name, raw in kafka_headers or ():
        if name.lower() in TRACE_HEADERS and raw is not None:
            context[name.lower()] = raw.decode(errors="replace")
    for mapping in overrides:
        for name, value in mapping.items():
            if name.lower() in TRACE_HEADERS:
                context[name.lower()] = value
    return _valid(context)


def _valid(context: dict[str, str]) -> dict[str, str]:
    parent = context.get("traceparent")
    if parent is None or not _TRACEPARENT.fullmatch(parent) or parent.startswith("ff"):
        return {}  # tracestate means nothing without a parent
    state = context.get("tracestate")
    if state is not None and (
        len(state) > _TRACESTATE_MAX or not state.isascii() or not state.isprintable()
    ):
        del context["tracestate"]
    return context


def grpc_metadata(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Trace headers as gRPC metadata, whoever wrote them: lower-cased, valid or none."""
    return list(context_from((), headers).items()) if headers else []
