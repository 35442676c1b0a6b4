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


def kafka_trace_headers(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """W3C trace context from a Kafka record's headers, if its producer put it there."""
    found: dict[str, str] = {}
    for name, value in headers or ():
        if name.lower() in TRACE_HEADERS and value is not None:
            found[name.lower()] = value.decode(errors="replace")
    return found


def valid_trace(context: dict[str, str]) -> dict[str, str]:
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
    if not headers:
        return []
    context = {k.lower(): v for k, v in headers.items() if k.lower() in TRACE_HEADERS}
    return list(valid_trace(context).items())
