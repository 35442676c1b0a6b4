"""Presence: how fast gateways' reports become routable in every worker's view.

Gateways publish `SyncStatusRequest`s of 50 users (as Resonance IM gateways batch them)
to the presence topic; a user is routable once every worker's routes view holds them
(`/stats` online_users). Figures, each with the CPU split:
- throughput: a backlog of presence updates published at once, updates/s to routable;
- storm: a reconnect storm (15,000 users on two gateways) to the last user routable;
- view delay: presence at a steady rate, published -> visible in each worker's view
  (p50/p99 from the workers' `resonance_presence_view_delay_seconds` histogram).

    python -m bench.presence [--updates N] [--storm N]     (also a scenario of python -m bench)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.harness import histogram, quantiles_ms, rss_mb
from bench.pipeline import System
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.proto.resonance.logic.v1.presence_pb2 import SyncStatusRequest, UserOnline

BATCH = 50
DELAY_METRIC = "resonance_view_delay_seconds"


def requests(tag: str, users: int, gateways: int = 2, start: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) of the SyncStatusRequests announcing `users` new users, 50 a request."""
    now = int(time.time() * 1000)
    out = []
    for first in range(start, start + users, BATCH):
        gateway = f"{tag}-gw-{(first // BATCH) % gateways + 1}"
        batch = SyncStatusRequest(seq_id=first // BATCH + 1, gateway_id=gateway)
        for i in range(first, min(first + BATCH, start + users)):
            batch.online_batch.append(
                UserOnline(username=f"{tag}-p{i:07d}", conn_id=f"c{i}", timestamp=now)
            )
        out.append((gateway.encode(), batch.SerializeToString()))
    return out


class PresenceBench:
    def __init__(self, system: System) -> None:
        self.system = system
        self.topic = system.env["TOPIC_PRESENCE"]
        self.announced = 0
        self._producer: AIOKafkaProducer | None = None

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            # As a gateway's client would: Kafka's default linger, batched sends.
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.system.broker.bootstrap, linger_ms=5
            )
            await self._producer.start()
        return self._producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    def online_counts(self) -> list[int]:
        return [int(w.get("/stats")[1]["online_users"]) for w in self.system.workers]

    async def publish(self, users: int) -> tuple[float, float]:
        """Announce `users` new users; returns when publishing started and ended."""
        producer = await self.producer()
        records = requests(self.system.tag, users, start=self.announced)
        self.announced += users
        t0 = time.monotonic()
        for key, value in records:
            await producer.send(self.topic, value, key=key)
        await producer.flush()
        return t0, time.monotonic()

    async def wait_visible(self, t0: float) -> float:
        """Seconds from `t0` until every worker's view holds every user announced."""
        timeout = 300.0
        while True:
            counts = await asyncio.to_thread(self.online_counts)
            elapsed = time.monotonic() - t0
            if min(counts) >= self.announced:
                return elapsed
            if elapsed > timeout:
                raise TimeoutError(f"views hold {counts} of {self.announced} after {timeout}s")
            # Every 50 ms: /stats costs the worker a little each time.
            await asyncio.sleep(0.05)

    async def burst(self, users: int) -> dict[str, Any]:
        """`users` updates published at once, until routable on every worker."""
        self.system.cpu.start()
        t0, published = await self.publish(users)
        seconds = await self.wait_visible(t0)
        return {
            "updates": users,
            "requests": -(-users // BATCH),
            "published_s": round(published - t0, 3),
            "routable_on_every_worker_s": round(seconds, 3),
            "updates_per_s": round(users / seconds),
            "cpu": self.system.cpu.split(),
            "worker_rss_mb": [
                rss_mb(w.proc.pid) if w.proc is not None else None for w in self.system.workers
            ],
        }

    async def steady(self, rate: float, seconds: float) -> dict[str, Any]:
        """Presence at `rate` updates/s: published -> visible, per worker."""
        urls = [f"http://127.0.0.1:{w.port}/metrics" for w in self.system.workers]
        before = [await asyncio.to_thread(histogram, u, DELAY_METRIC, "view") for u in urls]
        self.system.cpu.start()
        per_tick = BATCH
        interval = per_tick / rate
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            await self.publish(per_tick)
            sent += per_tick
            wait = start + sent / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        rate_done = sent / (time.monotonic() - start)
        await self.wait_visible(start)
        cpu = self.system.cpu.split()
        after = [await asyncio.to_thread(histogram, u, DELAY_METRIC, "view") for u in urls]
        return {
            "rate": round(rate_done),
            "interval_s": round(interval, 4),
            "updates": sent,
            "view_delay_ms": [
                quantiles_ms(b, a, (0.5, 0.99)).get("routes")
                for b, a in zip(before, after, strict=True)
            ],
            "cpu": cpu,
        }


async def run_on(
    broker: EmbeddedBroker,
    workdir: Path,
    *,
    quick: bool = False,
    updates: int = 300_000,
    storm: int = 15_000,
) -> dict[str, Any]:
    """The figures on one worker, then again on two (each sees every route)."""
    out: dict[str, Any] = {}
    for workers in (1, 2):
        system = System(broker, workdir, "pres" + uuid.uuid4().hex[:6])
        bench = PresenceBench(system)
        try:
            await asyncio.gather(
                *(system.start_worker(f"presence-{n}") for n in range(1, workers + 1))
            )
            label = "" if workers == 1 else "_two_workers"
            figures = await scenarios(bench, 30_000 if quick else updates, storm)
            out.update({f"{k}{label}": v for k, v in figures.items()})
        finally:
            await bench.close()
            await system.stop()
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="resonance-presence-"))
    with EmbeddedBroker(log_file=workdir / "tansu.log") as broker:
        return await run_on(broker, workdir, updates=args.updates, storm=args.storm)


async def scenarios(bench: PresenceBench, updates: int, storm: int) -> dict[str, Any]:
    """The three figures, on a system whose workers are ready."""
    await bench.burst(BATCH * 20)  # warm: every stage has fetched once
    return {
        "presence_throughput": await bench.burst(updates),
        "presence_storm": await bench.burst(storm),
        "presence_view_delay": await bench.steady(5_000, 10),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=300_000)
    parser.add_argument("--storm", type=int, default=15_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
