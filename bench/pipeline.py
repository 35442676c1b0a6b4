"""Benchmark: the pipeline, a naive per-recipient design and a bare consumer, in one run.

    python -m bench.pipeline [--one-to-one 4000] [--group-messages 150] [--quick]

Prints one JSON document. Everything runs on this machine against Tansu, the machine's
Redis (database 12, flushed) and gateway simulators (real gRPC servers), so compare the
figures side by side within a run, not across runs or machines.

- pipeline: `faust -A app worker` as a separate process; traffic produced in one burst;
  deliveries/s = (inbox writes + pushes) / time from first produce to the last of both.
- naive: the seeds' first design on the same events: per recipient, one awaited Redis
  round trip (the same idempotent append script); per online recipient, one unary Push
  RPC. It loops over the events in memory, so it pays no Kafka cost at all: the ratio
  flatters the naive side. It runs for a fixed time budget, then reports rates.
- ceiling: a bare aiokafka consumer that only reads the same push-event records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc.aio
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agents.fanout import push_message
from commands.traffic import group_chat, single_chat
from embedded.broker import EmbeddedBroker
from embedded.expectations import Expected, expected
from embedded.worker import WorkerProcess, pipeline_env
from gateway.simulator import GatewaySimulator
from proto.resonance.gateway.v1.gateway_pb2 import PushRequest
from proto.resonance.gateway.v1.gateway_pb2_grpc import PushServiceStub
from proto.resonance.mq.v1.push_event_pb2 import PushEvent
from stores.inbox import RedisInboxStore
from stores.members import RedisMemberStore

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class Bench:
    def __init__(self, broker: EmbeddedBroker, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        self.tag = "bench" + uuid.uuid4().hex[:6]
        self.env = pipeline_env(tag=self.tag, broker_url=broker.url, redis_url=REDIS_URL)
        self.users = [f"{self.tag}-u{i:05d}" for i in range(2000)]
        self.online = set(self.users[:1600])  # 80% online, on two gateways
        self.sims: list[GatewaySimulator] = []
        self.worker: WorkerProcess | None = None

    async def start(self) -> dict[str, Any]:
        started = time.monotonic()
        self.worker = WorkerProcess(self.env, self.workdir, "worker").start()
        await asyncio.to_thread(self.worker.wait_ready)
        ready_s = time.monotonic() - started
        holders = sorted(self.online)
        for n, chunk in enumerate((holders[:800], holders[800:]), start=1):
            sim = GatewaySimulator(
                f"{self.tag}-gw-{n}",
                bootstrap_servers=self.broker.bootstrap,
                presence_topic=self.env["TOPIC_PRESENCE"],
                heartbeat_topic=self.env["TOPIC_HEARTBEATS"],
            )
            await sim.start()
            await sim.connect(chunk)
            await sim.flush_presence()
            self.sims.append(sim)
        for probe in holders[::50] + holders[-1:]:
            await self._wait_route(probe)
        first = single_chat(self.users[1], self.users[0], 1, "first")
        t0 = time.monotonic()
        await self.produce([first])
        # Polled at 5 ms: the simulator records, it does not signal.
        while not self.deliveries():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        return {
            "worker_ready_s": round(ready_s, 2),
            "first_delivery_after_ready_ms": round((time.monotonic() - t0) * 1000, 1),
            "worker_rss_mb_idle": rss_mb(self.worker.proc.pid) if self.worker.proc else None,
        }

    async def _wait_route(self, user: str) -> None:
        assert self.worker is not None
        while True:
            status, body = await asyncio.to_thread(self.worker.get, f"/routes/{user}")
            if status == 200 and body["online_gateways"] and body["view_gateways"]:
                return
            await asyncio.sleep(0.05)

    def deliveries(self) -> int:
        return sum(len(s.recorder.deliveries) for s in self.sims)

    async def produce(self, events: list[PushEvent]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=5)
        await producer.start()
        for event in events:
            event.timestamp = int(time.time() * 1000)  # accepted "now", as a logic service would
            await producer.send(
                self.env["TOPIC_PUSH_EVENTS"],
                event.SerializeToString(),
                key=event.session_id.encode(),
            )
        await producer.flush()
        await producer.stop()

    def counters(self) -> dict[str, float]:
        assert self.worker is not None
        _, stats = self.worker.get("/stats")
        return dict(stats["counters"])

    async def run_scenario(
        self, name: str, events: list[PushEvent], want: Expected
    ) -> dict[str, Any]:
        assert self.worker is not None
        for sim in self.sims:
            sim.recorder.deliveries.clear()
        base = await asyncio.to_thread(self.counters)
        t0 = time.monotonic()
        await self.produce(events)
        produced_s = time.monotonic() - t0
        inbox_done = push_done = None
        rss_peak = 0.0
        while inbox_done is None or push_done is None:
            now = await asyncio.to_thread(self.counters)
            written = now.get("resonance_inbox_writes_total{result=new}", 0) - base.get(
                "resonance_inbox_writes_total{result=new}", 0
            )
            if inbox_done is None and written >= want.inbox_total:
                inbox_done = time.monotonic() - t0
            offline = sum(
                v - base.get(k, 0) for k, v in now.items() if k.startswith("resonance_offline")
            )
            # Done when every push recipient reached a gateway or went to offline push.
            if (
                push_done is None
                and self.deliveries() + offline >= want.pushed_total + want.offline_total
            ):
                push_done = time.monotonic() - t0
            rss_peak = max(rss_peak, rss_mb(self.worker.proc.pid) or 0) if self.worker.proc else 0
            if time.monotonic() - t0 > 600:
                raise TimeoutError(f"{name}: not drained in 600s")
            await asyncio.sleep(0.1)
        latencies = [r.latency_ms for s in self.sims for r in s.recorder.deliveries]
        total = max(inbox_done, push_done)
        return {
            "events": len(events),
            "recipients_stored": want.inbox_total,
            "recipients_pushed": want.pushed_total,
            "pushes_received": self.deliveries(),
            "produce_s": round(produced_s, 2),
            "last_inbox_write_s": round(inbox_done, 2),
            "last_push_s": round(push_done, 2),
            "events_per_s": round(len(events) / total, 1),
            "inbox_writes_per_s": round(want.inbox_total / inbox_done, 1),
            "pushes_per_s": round(want.pushed_total / push_done, 1),
            "deliveries_per_s": round((want.inbox_total + want.pushed_total) / total, 1),
            "latency_ms_p50": pct(latencies, 0.5),
            "latency_ms_p99": pct(latencies, 0.99),
            "worker_rss_mb_peak": rss_peak,
        }

    async def stop(self) -> None:
        for sim in self.sims:
            await sim.stop()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)


async def naive(
    bench: Bench, events: list[PushEvent], members: dict[str, list[str]], budget_s: float
) -> dict[str, Any]:
    """One Redis round trip per recipient and one unary Push per online recipient."""
    store = RedisInboxStore(REDIS_URL, max_entries=0, message_ttl=3600, cluster=True)
    address = {u: s.address for s in bench.sims for u in s.online}
    channels = {a: grpc.aio.insecure_channel(a) for a in set(address.values())}
    stubs: dict[str, Any] = {a: PushServiceStub(c) for a, c in channels.items()}
    for sim in bench.sims:
        sim.recorder.deliveries.clear()
    writes = pushes = handled = 0
    t0 = time.monotonic()
    for event in events:
        recipients = list(event.to_usernames) or (
            [event.to_username] if event.to_username else members[event.session_id]
        )
        message = push_message(event)
        for user in {event.from_username, *recipients}:
            await store.write([(message, [user])])
            writes += 1
            if user != event.from_username and user in address:
                await stubs[address[user]].Push(PushRequest(to_usernames=[user], message=message))
                pushes += 1
        handled += 1
        if time.monotonic() - t0 > budget_s:
            break
    elapsed = time.monotonic() - t0
    for channel in channels.values():
        await channel.close(grace=None)
    await store.close()
    return {
        "events": handled,
        "seconds": round(elapsed, 2),
        "events_per_s": round(handled / elapsed, 1),
        "inbox_writes_per_s": round(writes / elapsed, 1),
        "pushes_per_s": round(pushes / elapsed, 1),
        "deliveries_per_s": round((writes + pushes) / elapsed, 1),
    }


async def ceiling(broker: EmbeddedBroker, topic: str, count: int) -> dict[str, Any]:
    """A bare aiokafka consumer reading the same push-event records, nothing else."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    t0 = time.monotonic()
    seen = 0
    while seen < count:
        batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
        if not batch:
            break
        seen += sum(len(r) for r in batch.values())
    elapsed = time.monotonic() - t0
    await consumer.stop()
    return {"records": seen, "seconds": round(elapsed, 3), "events_per_s": round(seen / elapsed, 1)}


def one_to_one(users: list[str], count: int, seed: int) -> list[PushEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.sample(users, 2)
        out.append(single_chat(a, b, 1 + i, f"bench message {i} " + "x" * 100))
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="resonance-bench-"))
    with EmbeddedBroker(log_file=workdir / "tansu.log") as broker:
        bench = Bench(broker, workdir)
        result: dict[str, Any] = {
            "machine": {"cores": os.cpu_count()},
            "startup": await bench.start(),
        }
        members_store = RedisMemberStore(REDIS_URL)
        groups = {f"{bench.tag}-group-{g}": bench.users[g * 200 : g * 200 + 1000] for g in range(5)}
        for session_id, members in groups.items():
            await members_store.add(session_id, members)
        await members_store.close()
        try:
            single = one_to_one(bench.users, args.one_to_one, 1)
            result["pipeline_1to1"] = await bench.run_scenario(
                "1:1", single, expected(single, {}, bench.online)
            )
            rng = random.Random(2)
            group_events = [
                group_chat(rng.choice(groups[g]), g, i + 1, f"group message {i}")
                for i, g in enumerate(
                    rng.choice(sorted(groups)) for _ in range(args.group_messages)
                )
            ]
            result["pipeline_group_1000"] = await bench.run_scenario(
                "group", group_events, expected(group_events, groups, bench.online)
            )
            if args.pipeline_only:
                return result
            budget = 20 if args.quick else 40
            result["naive_1to1"] = await naive(
                bench, one_to_one(bench.users, 20_000, 3), {}, budget
            )
            result["naive_group_1000"] = await naive(bench, group_events, groups, budget)
            result["ceiling_bare_consumer"] = await ceiling(
                broker, bench.env["TOPIC_PUSH_EVENTS"], args.one_to_one + args.group_messages + 1
            )
        finally:
            await bench.stop()
    p, n = result["pipeline_1to1"], result["naive_1to1"]
    g, ng = result["pipeline_group_1000"], result["naive_group_1000"]
    result["ratios"] = {
        "1to1_deliveries_pipeline_over_naive": round(
            p["deliveries_per_s"] / n["deliveries_per_s"], 2
        ),
        "group_deliveries_pipeline_over_naive": round(
            g["deliveries_per_s"] / ng["deliveries_per_s"], 2
        ),
        "1to1_events_pipeline_over_ceiling": round(
            p["events_per_s"] / result["ceiling_bare_consumer"]["events_per_s"], 4
        ),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one-to-one", type=int, default=4000)
    parser.add_argument("--group-messages", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="small run, to check the harness")
    parser.add_argument("--pipeline-only", action="store_true", help="skip naive and ceiling")
    args = parser.parse_args()
    if args.quick:
        args.one_to_one, args.group_messages = 500, 20
    if args.pipeline_only:
        args.quick = True
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
