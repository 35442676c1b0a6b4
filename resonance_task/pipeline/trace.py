"""W3C trace context as it travels with a message (Kafka headers, the event, gRPC
metadata), and the OpenTelemetry spans each stage adds to it.

Keys are lower-cased (HTTP and Kafka headers are case-insensitive; gRPC metadata keys
must be lower case, and grpc refuses a call with any other) and values that are not
valid W3C are dropped: a bad header would fail every push to a gateway, for a trace
nobody can follow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

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


# Spans (OpenTelemetry). A message that carries a W3C context gets a span in each stage,
# a child of the previous stage's, whose context it carries on: internal records'
# trace_headers, then the gateway's PushRequest and gRPC metadata. A message without one
# gets none (the logic service decides what is traced; at thousands of messages a second,
# a root trace per message would cost more than the fan-out). Without OTEL_TRACES_EXPORTER
# the API's no-op tracer answers and nothing of the SDK is imported.

_tracer = trace.get_tracer("resonance")
_propagator = TraceContextTextMapPropagator()
_exporting = False  # without an exporter, contexts pass through untouched and unparsed


def setup_tracing(exporter: str, service_name: str) -> TracerProvider | None:
    """The SDK with `exporter` ("otlp" or "console"), or None for "none". The OTLP
    exporter, sampler and batch processor read OpenTelemetry's own environment
    variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER, OTEL_BSP_*)."""
    if exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    span_exporter: SpanExporter
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    else:
        span_exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    global _tracer, _exporting
    _tracer, _exporting = trace.get_tracer("resonance"), True
    return provider


def start_span(name: str, headers: Mapping[str, str], msg_id: int) -> Span | None:
    """A CONSUMER span of stage `name` for message `msg_id`, child of the context in
    `headers`; None when they carry none or nothing exports spans (checked before
    anything is built: this runs per message and per push). The caller ends it
    (`span.end()`); it is never made current."""
    if not headers or not _exporting:
        return None
    parent = _propagator.extract(headers)
    if not trace.get_current_span(parent).get_span_context().is_valid:
        return None  # no valid traceparent: a root span here would start a trace of ours
    return _tracer.start_span(
        name, context=parent, kind=SpanKind.CONSUMER, attributes={"resonance.msg_id": msg_id}
    )


def headers_of(span: Span | None, fallback: Mapping[str, str]) -> Mapping[str, str]:
    """What the next stage carries: `span`'s context if it records, else `fallback`."""
    if span is None or not span.get_span_context().is_valid:
        return fallback
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier
