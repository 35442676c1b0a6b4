"""One PushEvent's trace, followed from the logic service's context through every stage to
the gateway: the worker exports its spans over OTLP/HTTP to a receiver the test runs."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from resonance_task.commands.traffic import group_chat, single_chat
from resonance_task.embedded.broker import free_port
from resonance_task.embedded.providers import ProviderServer
from resonance_task.offline.tokens import DeviceToken, RedisDeviceTokenStore
from tests.harness import PipelineFactory, eventually

pytestmark = pytest.mark.slow


class OtlpReceiver:
    """The OTLP/HTTP traces endpoint of a collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _export(self, request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest.FromString(await request.read())
        for resource in body.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


async def test_a_push_events_trace_runs_through_every_stage_to_the_gateway(
    pipeline_factory: PipelineFactory, redis_url: str
) -> None:
    receiver = await OtlpReceiver().start()
    providers = await ProviderServer().start()
    try:
        p = pipeline_factory(
            otel_traces_exporter="otlp",
            otel_exporter_otlp_traces_endpoint=f"http://127.0.0.1:{receiver.port}/v1/traces",
            otel_bsp_schedule_delay=200,  # ms between exports: the test waits less
            offline_webhook_url=providers.url + "/webhook",
        )
        online, sender, away = p.user(0), p.user(1), p.user(2)
        tokens = RedisDeviceTokenStore(redis_url)
        await tokens.register(away, DeviceToken("webhook", f"{away}-web", "web"))
        await tokens.close()
        worker = await p.start_worker()
        sim = await p.gateway("gw-trace", [online])
        await p.wait_online(worker, [online])

        trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
        traced = group_chat(sender, f"{p.tag}-g", 1, "follow me")
        await p.members.add(f"{p.tag}-g", [sender, online, away])
        traced.trace_headers["traceparent"] = f"00-{trace_id}-{caller}-01"
        untraced = single_chat(sender, online, 2, "no context, no spans")
        await p.publish([traced, untraced])

        async def exported() -> bool:
            return (
                len(sim.recorder.deliveries) == 2
                and len(receiver.named("push")) == 1
                and len(receiver.named("storage")) == 1
                and len(receiver.named("offline_push")) == 1
            )

        await eventually(exported, 60, "the deliveries and the exported spans")
        # Only the event with a context was traced, and every span is of its trace.
        assert {s.trace_id.hex() for s in receiver.spans} == {trace_id}
        (fanout,) = receiver.named("fanout")
        (storage,) = receiver.named("storage")
        (push,) = receiver.named("push")
        assert fanout.parent_span_id.hex() == caller
        (offline,) = receiver.named("offline_push")
        assert storage.parent_span_id == fanout.span_id
        assert push.parent_span_id == fanout.span_id
        assert offline.parent_span_id == fanout.span_id  # no route: offline from fanout
        assert {a.key: a.value for a in storage.attributes}["resonance.recipients"].int_value == 3
        attributes = {a.key: a.value for a in push.attributes}
        assert attributes["resonance.msg_id"].int_value == traced.msg_id
        assert attributes["resonance.delivered"].int_value == 1
        # The gateway got the push span as the parent of whatever it does next.
        received = {r.msg_id: r.traceparent for r in sim.recorder.deliveries}
        assert received[untraced.msg_id] == ""
        assert received[traced.msg_id] == f"00-{trace_id}-{push.span_id.hex()}-01"
        assert len(providers.pushes("/webhook")) == 1
    finally:
        await asyncio.shield(receiver.stop())
        await providers.stop()
