"""`faust -A resonance_task.app gateway-sim`: run a simulated gateway until interrupted or
--duration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
from pathlib import Path
from typing import Any

from faust.cli import option

from resonance_task.gateway.simulator import GatewaySimulator, Recorder
from resonance_task.pipeline.kafka_security import aiokafka_auth
from resonance_task.settings import Settings


def summary(gateway_id: str, recorder: Recorder) -> dict[str, Any]:
    latencies = recorder.latencies()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    return {
        "gateway_id": gateway_id,
        "deliveries": len(recorder.deliveries),
        "batches": recorder.batches,
        "bodies": recorder.bodies,
        "unary_calls": recorder.unary_calls,
        "failed_reported": recorder.failed_reported,
        "latency_ms_p50": pct(0.50),
        "latency_ms_p99": pct(0.99),
        "latency_ms_mean": round(statistics.fmean(latencies), 2) if latencies else None,
    }


def register(app: Any, settings: Settings) -> None:
    @app.command(
        option("--id", "gateway_id", default="gateway-001", help="gateway_id"),
        option("--users", type=int, default=100, help="simulated users online"),
        option("--user-prefix", default="user-", help="usernames: prefix + 5-digit index"),
        option("--first-user", type=int, default=0, help="index of the first user"),
        option("--port", type=int, default=0, help="gRPC port (0: any free port)"),
        option("--bind", default="127.0.0.1", help="address the gRPC server listens on"),
        option("--advertise", default="", help="host workers dial (default: --bind)"),
        option("--delay", type=float, default=0.0, help="seconds before each ack"),
        option("--fail-every", type=int, default=0, help="report every Nth user as failed"),
        option("--no-ack", is_flag=True, default=False, help="receive and never ack"),
        option("--unary-only", is_flag=True, default=False, help="no PushStream (Resonance IM)"),
        option("--duration", type=float, default=0.0, help="seconds to run (0: until Ctrl-C)"),
        option("--report", default="", help="write the JSON summary to this file on exit"),
    )
    async def gateway_sim(
        self: Any,
        gateway_id: str,
        users: int,
        user_prefix: str,
        first_user: int,
        port: int,
        bind: str,
        advertise: str,
        delay: float,
        fail_every: int,
        no_ack: bool,
        unary_only: bool,
        duration: float,
        report: str,
    ) -> None:
        """Run a simulated gateway: gRPC PushService, presence, heartbeats, a delivery log."""
        names = [f"{user_prefix}{i:05d}" for i in range(first_user, first_user + users)]
        sim = GatewaySimulator(
            gateway_id,
            bootstrap_servers=settings.bootstrap_servers,
            presence_topic=settings.topic_presence,
            heartbeat_topic=settings.topic_heartbeats,
            port=port,
            bind_host=bind,
            advertise_host=advertise or None,
            delay=delay,
            fail_users=names[::fail_every] if fail_every else (),
            ack=not no_ack,
            stream=not unary_only,
            kafka_config=aiokafka_auth(settings),
        )
        await sim.start()
        await sim.connect(names)
        await sim.flush_presence()
        print(
            json.dumps({"gateway_id": gateway_id, "address": sim.address, "users": users}),
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration or None)
        await sim.stop(heartbeat_draining=True)
        result = summary(gateway_id, sim.recorder)
        print(json.dumps(result), flush=True)
        if report:
            await asyncio.to_thread(Path(report).write_text, json.dumps(result))
