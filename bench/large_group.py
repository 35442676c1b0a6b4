"""Benchmark: one message to a 100k-member group, 10% online, on one worker.

    python -m bench.large_group [--members 100000] [--online 0.1] [--messages 1]

Prints one JSON document: for each variant, the time from the produce to the last inbox
write and to the last push (every online member acknowledged by its gateway, every
other member handed to offline push). Variants run one after the other in one run, each
with a fresh worker (its own consumer group) over the same gateways and member store:
- large_group: the large_group agent pages the group (LARGE_GROUP_MIN_MEMBERS=2000),
  each page's cursor saved before the next page is sent (the default);
- large_group_window4: the same with 4 pages sent ahead of the saved cursor;
- inline: fanout pages the group itself (LARGE_GROUP_MIN_MEMBERS=0), as before the agent;
- read_diffusion: one timeline write, pushes to online members only.
Tansu, Redis (database 12, flushed) and the gateways (real gRPC servers) share this
machine: compare the variants within a run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from aiokafka import AIOKafkaProducer

from bench.harness import CpuMeter, pct, redis_pid, rss_mb
from resonance_task.commands.traffic import group_chat
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.worker import WorkerProcess, pipeline_env
from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.stores.members import RedisMemberStore

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
GATEWAYS = 4
VARIANTS: dict[str, dict[str, Any]] = {
    "large_group": {"large_group_min_members": 2000, "read_diffusion_min_members": 0},
    "large_group_window4": {
        "large_group_min_members": 2000,
        "read_diffusion_min_members": 0,
        "large_group_pages_in_flight": 4,
    },
    "inline": {"large_group_min_members": 0, "read_diffusion_min_members": 0},
    "read_diffusion": {"large_group_min_members": 2000, "read_diffusion_min_members": 50_000},
}


class LargeGroupBench:
    def __init__(self, broker: EmbeddedBroker, workdir: Path, members: int, online: float):
        self.broker = broker
        self.workdir = workdir
        self.tag = "lgbench" + uuid.uuid4().hex[:6]
        self.members = [f"{self.tag}-u{i:06d}" for i in range(members)]
        step = round(1 / online)
        self.online = self.members[::step]
        self.group = f"{self.tag}-group"
        self.sender = self.members[1]  # not online: every online member is pushed to
        self.sims: list[GatewaySimulator] = []
        self.base_env = pipeline_env(tag=self.tag, broker_url=broker.url, redis_url=REDIS_URL)

    async def setup(self) -> dict[str, Any]:
        t0 = time.monotonic()
        store = RedisMemberStore(REDIS_URL)
        await store.add(self.group, self.members)
        await store.close()
        members_s = time.monotonic() - t0
        share = len(self.online) // GATEWAYS + 1
        for n in range(GATEWAYS):
            sim = GatewaySimulator(
                f"{self.tag}-gw-{n}",
                bootstrap_servers=self.broker.bootstrap,
                presence_topic=self.base_env["TOPIC_PRESENCE"],
                heartbeat_topic=self.base_env["TOPIC_HEARTBEATS"],
            )
            await sim.start()
            await sim.connect(self.online[n * share : (n + 1) * share])
            await sim.flush_presence()
            self.sims.append(sim)
        return {
            "members": len(self.members),
            "online": len(self.online),
            "gateways": GATEWAYS,
            "member_store_fill_s": round(members_s, 2),
        }

    async def run(self, name: str, overrides: dict[str, Any], messages: int) -> dict[str, Any]:
        env = {
            **self.base_env,
            "APP_ID": f"rt-{self.tag}-{name}",
            "TOPIC_PUSH_EVENTS": f"{self.tag}.{name}.push.event.v1",
            "TOPIC_OFFLINE_PUSHES": f"{self.tag}.{name}.offline.push.v1",
            **{k.upper(): str(v) for k, v in overrides.items()},
        }
        worker = WorkerProcess(env, self.workdir, f"worker-{name}").start()
        try:
            await asyncio.to_thread(worker.wait_ready)
            await self._wait_routes(worker)
            for sim in self.sims:
                sim.recorder.deliveries.clear()
            return await self._measure(worker, env, overrides, messages)
        finally:
            await asyncio.to_thread(worker.stop)

    async def _wait_routes(self, worker: WorkerProcess) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            _, stats = await asyncio.to_thread(worker.get, "/stats")
            if stats and stats["online_users"] >= len(self.online):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(worker.log_tail())

    async def _measure(
        self, worker: WorkerProcess, env: dict[str, str], overrides: dict[str, Any], n: int
    ) -> dict[str, Any]:
        read = overrides["read_diffusion_min_members"] > 0
        want_inbox = 0 if read else n * len(self.members)
        want_pushed = n * len(self.online)
        want_offline = 0 if read else n * (len(self.members) - len(self.online) - 1)
        events = [group_chat(self.sender, self.group, seq, "x" * 200) for seq in range(1, n + 1)]
        producer = AIOKafkaProducer(bootstrap_servers=self.broker.bootstrap)
        await producer.start()
        assert worker.proc is not None
        cpu = CpuMeter()
        cpu.watch("worker", worker.proc.pid)
        cpu.watch("broker", self.broker.pid)
        cpu.watch("redis", redis_pid(REDIS_URL))
        cpu.watch("gateways_and_bench", os.getpid())
        cpu.start()
        t0 = time.monotonic()
        for event in events:
            await producer.send(
                env["TOPIC_PUSH_EVENTS"], event.SerializeToString(), key=self.group.encode()
            )
        await producer.flush()
        await producer.stop()
        inbox_s = 0.0 if read else None
        push_s = None
        rss_peak = 0.0
        while inbox_s is None or push_s is None:
            _, stats = await asyncio.to_thread(worker.get, "/stats")
            counters = stats["counters"]
            now = time.monotonic() - t0
            if (
                inbox_s is None
                and counters.get("resonance_inbox_writes_total{result=new}", 0) >= want_inbox
            ):
                inbox_s = now
            pushed = sum(len(s.recorder.deliveries) for s in self.sims)
            offline = counters.get("resonance_offline_users_total{reason=not_online}", 0)
            if push_s is None and pushed >= want_pushed and offline >= want_offline:
                push_s = now
            if worker.proc is not None:
                rss_peak = max(rss_peak, rss_mb(worker.proc.pid) or 0.0)
            if now > 600:
                raise TimeoutError(f"not drained in 600 s: {stats}")
            await asyncio.sleep(0.05)
        split = cpu.split()
        latencies = [r.latency_ms for s in self.sims for r in s.recorder.deliveries]
        _, jobs = await asyncio.to_thread(worker.get, "/large-groups")
        return {
            "messages": n,
            "inbox_entries": want_inbox,
            "pushed": sum(len(s.recorder.deliveries) for s in self.sims),
            "offline": want_offline,
            "last_inbox_write_s": round(inbox_s, 2),
            "last_push_s": round(push_s, 2),
            "push_latency_ms_p50": pct(latencies, 0.5),
            "push_latency_ms_p99": pct(latencies, 0.99),
            "pages": sum(j["pages"] for j in jobs["finished"]),
            "worker_rss_mb_peak": rss_peak,
            "cpu": split,
        }

    async def stop(self) -> None:
        for sim in self.sims:
            await sim.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="resonance-bench-lg-"))
    with EmbeddedBroker(log_file=workdir / "tansu.log") as broker:
        bench = LargeGroupBench(broker, workdir, args.members, args.online)
        result: dict[str, Any] = {"machine": {"cores": os.cpu_count()}}
        try:
            result["setup"] = await bench.setup()
            for name in args.variants.split(","):
                result[name] = await bench.run(name, VARIANTS[name], args.messages)
        finally:
            await bench.stop()
    if "large_group" in result and "inline" in result:
        result["ratios"] = {
            "last_push_inline_over_large_group": round(
                result["inline"]["last_push_s"] / result["large_group"]["last_push_s"], 2
            ),
            "last_inbox_inline_over_large_group": round(
                result["inline"]["last_inbox_write_s"]
                / result["large_group"]["last_inbox_write_s"],
                2,
            ),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--online", type=float, default=0.1)
    parser.add_argument("--messages", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
