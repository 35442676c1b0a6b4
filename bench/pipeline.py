"""The pipeline under load: 1:1 bursts, a steady rate, groups, ceilings, more workers.

A `System` is Tansu, the machine's Redis (database 12, flushed),
`faust -A resonance_task.app worker` processes and two gateway simulators (real gRPC
servers, in this process) holding 80% of 2,000 users. Load comes from bench/loadgen.py
in a process of its own. Every figure
carries the CPU each process used while it was measured (bench/harness.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc.aio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.harness import CpuMeter, histogram, pct, quantiles_ms, redis_pid, rss_mb
from bench.loadgen import one_to_one_pairs, users
from resonance_task.agents.fanout import push_message
from resonance_task.commands.traffic import group_chat
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.worker import ROOT, WorkerProcess, pipeline_env
from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage, PushRequest
from resonance_task.proto.resonance.gateway.v1.gateway_pb2_grpc import PushServiceStub
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.stores.inbox import RedisInboxStore
from resonance_task.stores.members import RedisMemberStore

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
NEW = "resonance_inbox_writes_total{result=new}"


class System:
    def __init__(
        self, broker: EmbeddedBroker, workdir: Path, tag: str, *, user_count: int = 2000
    ) -> None:
        self.broker = broker
        self.workdir = workdir
        self.tag = tag
        self.env = pipeline_env(tag=tag, broker_url=broker.url, redis_url=REDIS_URL)
        self.users_spec = f"{tag}:{user_count}"
        self.users = users(self.users_spec)
        self.online = set(self.users[: user_count * 4 // 5])
        self.workers: list[WorkerProcess] = []
        self.sims: list[GatewaySimulator] = []
        self.cpu = CpuMeter()
        self.cpu.watch("broker", broker.pid)
        self.cpu.watch("redis", redis_pid(REDIS_URL))
        self.cpu.watch("gateways_and_bench", os.getpid())

    async def start_worker(self, name: str, **overrides: Any) -> tuple[WorkerProcess, float]:
        env = {**self.env, **{k.upper(): str(v) for k, v in overrides.items()}}
        started = time.monotonic()
        worker = WorkerProcess(env, self.workdir, name).start()
        await asyncio.to_thread(worker.wait_ready)
        self.workers.append(worker)
        assert worker.proc is not None
        self.cpu.watch(name, worker.proc.pid)
        return worker, time.monotonic() - started

    async def start_gateways(self) -> None:
        holders = sorted(self.online)
        half = len(holders) // 2
        for n, chunk in enumerate((holders[:half], holders[half:]), start=1):
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

    async def wait_routed(self) -> None:
        """Every worker's routes view holds every online user, and both gateways."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stats = [await asyncio.to_thread(w.get, "/stats") for w in self.workers]
            if all(
                body["online_users"] >= len(self.online) and body["gateways_known"] >= 2
                for _, body in stats
            ):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("routes not visible on every worker")

    def counters(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for worker in self.workers:
            _, stats = worker.get("/stats")
            for key, value in stats["counters"].items():
                total[key] = total.get(key, 0.0) + value
        return total

    def pushes(self) -> int:
        return sum(len(s.recorder.deliveries) for s in self.sims)

    def latencies(self) -> list[float]:
        return [r.latency_ms for s in self.sims for r in s.recorder.deliveries]

    def clear(self) -> None:
        for sim in self.sims:
            sim.recorder.deliveries.clear()

    def loadgen(self, count: int, *, seed: int, rate: float = 0.0, **extra: str) -> Any:
        args = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--bootstrap",
            self.broker.bootstrap,
            "--topic",
            self.env["TOPIC_PUSH_EVENTS"],
            "--users",
            self.users_spec,
            "--count",
            str(count),
            "--seed",
            str(seed),
            "--rate",
            str(rate),
        ]
        for key, value in extra.items():
            args += [f"--{key}", value]
        proc = subprocess.Popen(
            args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ}
        )
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the load generator did not start")
        self.cpu.watch("load_generator", proc.pid)
        return proc

    @staticmethod
    def go(proc: Any) -> None:
        """Let a load generator started by `loadgen` send."""
        proc.stdin.write(b"go\n")
        proc.stdin.flush()

    async def drain(
        self, t0: float, *, inbox: int, pushed: int, offline: int, base: dict[str, float]
    ) -> dict[str, Any]:
        """Wait until every inbox write, push and offline push expected has happened."""
        inbox_s = push_s = None
        rss_peak = 0.0
        while inbox_s is None or push_s is None:
            now = await asyncio.to_thread(self.counters)
            elapsed = time.monotonic() - t0
            if inbox_s is None and now.get(NEW, 0) - base.get(NEW, 0) >= inbox:
                inbox_s = elapsed
            went_offline = sum(
                v - base.get(k, 0) for k, v in now.items() if k.startswith("resonance_offline")
            )
            if push_s is None and self.pushes() >= pushed and went_offline >= offline:
                push_s = elapsed
            for worker in self.workers:
                if worker.proc is not None:
                    rss_peak = max(rss_peak, rss_mb(worker.proc.pid) or 0.0)
            if elapsed > 600:
                raise TimeoutError("not drained in 600 s")
            await asyncio.sleep(0.05)
        return {
            "last_inbox_write_s": inbox_s,
            "last_push_s": push_s,
            "worker_rss_mb_peak": rss_peak,
        }

    async def stop(self) -> None:
        for sim in self.sims:
            await sim.stop()
        for worker in self.workers:
            await asyncio.to_thread(worker.stop)


async def first_delivery(system: System) -> float:
    """ms from one message's produce to its receipt by the gateway, on an idle pipeline."""
    system.clear()
    proc = await asyncio.to_thread(system.loadgen, 1, seed=99)
    t0 = time.monotonic()
    system.go(proc)
    await asyncio.to_thread(proc.wait)
    while not system.pushes() and time.monotonic() - t0 < 30:  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    return round(system.latencies()[0], 1) if system.latencies() else -1.0


async def idle_cost(system: System, seconds: float = 5.0) -> dict[str, Any]:
    """CPU and memory with nothing to do: what the short fetch waits cost at rest."""
    system.cpu.start()
    await asyncio.sleep(seconds)
    worker = system.workers[0]
    assert worker.proc is not None
    return {"worker_rss_mb": rss_mb(worker.proc.pid), "cpu": system.cpu.split()}


async def _one_to_one_load(
    system: System, count: int, seed: int, rate: float
) -> tuple[int, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Produce `count` 1:1 messages (at `rate`, or as fast as it goes: 0) and drain them.

    Returns the pushes expected, the drain's figures, the CPU split and the load
    generator's own report.
    """
    pairs = one_to_one_pairs(system.users, count, seed)
    pushed = sum(1 for _, recipient in pairs if recipient in system.online)
    system.clear()
    base = await asyncio.to_thread(system.counters)
    proc = await asyncio.to_thread(system.loadgen, count, seed=seed, rate=rate)
    system.cpu.start()
    t0 = time.monotonic()
    system.go(proc)
    done = await system.drain(t0, inbox=2 * count, pushed=pushed, offline=count - pushed, base=base)
    cpu = system.cpu.split()
    produced = json.loads(await asyncio.to_thread(proc.stdout.read))
    return pushed, done, cpu, produced


async def one_to_one(system: System, count: int, seed: int) -> dict[str, Any]:
    """A burst of 1:1 messages, end to end: every inbox write and every push."""
    pushed, done, cpu, produced = await _one_to_one_load(system, count, seed, 0.0)
    total = max(done["last_inbox_write_s"], done["last_push_s"])
    return {
        "events": count,
        "inbox_writes": 2 * count,
        "pushes": pushed,
        "load_generator_rate": produced["rate"],
        "last_inbox_write_s": round(done["last_inbox_write_s"], 2),
        "last_push_s": round(done["last_push_s"], 2),
        "events_per_s": round(count / total),
        "inbox_writes_per_s": round(2 * count / done["last_inbox_write_s"]),
        "pushes_per_s": round(pushed / done["last_push_s"]),
        "latency_ms_p50": pct(system.latencies(), 0.5),
        "latency_ms_p99": pct(system.latencies(), 0.99),
        "worker_rss_mb_peak": done["worker_rss_mb_peak"],
        "cpu": cpu,
    }


async def steady(system: System, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """1:1 messages at a steady rate: latency from produce to gateway receipt."""
    count = int(rate * seconds)
    metrics_url = f"http://127.0.0.1:{system.workers[0].port}/metrics"
    ages = "resonance_message_age_seconds"
    before = await asyncio.to_thread(histogram, metrics_url, ages, "stage")
    _, done, cpu, produced = await _one_to_one_load(system, count, seed, rate)
    after = await asyncio.to_thread(histogram, metrics_url, ages, "stage")
    latencies = system.latencies()
    return {
        "target_rate": round(rate),
        "achieved_produce_rate": produced["rate"],
        "events": count,
        "seconds": seconds,
        "drained_after_last_produce_s": round(done["last_push_s"] - produced["seconds"], 2),
        "latency_ms_p50": pct(latencies, 0.5),
        "latency_ms_p99": pct(latencies, 0.99),
        "latency_ms_max": pct(latencies, 1.0),
        # Where the time goes: a message's age when fanout takes it (one broker hop), when
        # push takes it (two), when its gateway acknowledged it; from the worker's histogram.
        "age_at_stage_ms": quantiles_ms(before, after, (0.5, 0.99)),
        "cpu": cpu,
    }


async def groups(
    system: System, groups: dict[str, list[str]], messages: int, seed: int
) -> dict[str, Any]:
    """Messages to 1000-member groups: deliveries (inbox writes + pushes) per second."""
    ids = sorted(groups)
    events = [
        group_chat(groups[ids[i % len(ids)]][i % 7], ids[i % len(ids)], i, "g")
        for i in range(messages)
    ]
    inbox = sum(len(groups[e.session_id]) for e in events)
    pushed = sum(
        len([u for u in groups[e.session_id] if u in system.online and u != e.from_username])
        for e in events
    )
    offline = sum(
        len([u for u in groups[e.session_id] if u not in system.online and u != e.from_username])
        for e in events
    )
    system.clear()
    base = await asyncio.to_thread(system.counters)
    system.cpu.start()
    t0 = time.monotonic()
    await produce_events(system, events)
    done = await system.drain(t0, inbox=inbox, pushed=pushed, offline=offline, base=base)
    cpu = system.cpu.split()
    total = max(done["last_inbox_write_s"], done["last_push_s"])
    return {
        "messages": messages,
        "inbox_writes": inbox,
        "pushes": pushed,
        "last_inbox_write_s": round(done["last_inbox_write_s"], 2),
        "last_push_s": round(done["last_push_s"], 2),
        "deliveries_per_s": round((inbox + pushed) / total),
        "inbox_writes_per_s": round(inbox / done["last_inbox_write_s"]),
        "pushes_per_s": round(pushed / done["last_push_s"]),
        "worker_rss_mb_peak": done["worker_rss_mb_peak"],
        "cpu": cpu,
    }


async def produce_events(system: System, events: list[PushEvent]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=system.broker.bootstrap, linger_ms=2)
    await producer.start()
    for event in events:
        event.timestamp = int(time.time() * 1000)
        await producer.send(
            system.env["TOPIC_PUSH_EVENTS"],
            event.SerializeToString(),
            key=event.session_id.encode(),
        )
    await producer.flush()
    await producer.stop()


async def naive(
    system: System, events: list[PushEvent], members: dict[str, list[str]], budget_s: float
) -> dict[str, Any]:
    """The seeds' first design: one Redis round trip and one unary Push per recipient.

    It loops over events in memory, so it pays no Kafka cost at all: the ratio flatters it.
    """
    store = RedisInboxStore(REDIS_URL, max_entries=0, message_ttl=3600)
    address = {u: s.address for s in system.sims for u in s.online}
    channels = {a: grpc.aio.insecure_channel(a) for a in set(address.values())}
    stubs: dict[str, Any] = {a: PushServiceStub(c) for a, c in channels.items()}
    system.clear()
    writes = pushes = handled = 0
    system.cpu.start()
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
    cpu = system.cpu.split()
    for channel in channels.values():
        await channel.close(grace=None)
    await store.close()
    return {
        "events": handled,
        "seconds": round(elapsed, 2),
        "events_per_s": round(handled / elapsed, 1),
        "deliveries_per_s": round((writes + pushes) / elapsed, 1),
        "cpu": cpu,
    }


async def bare_consumer(broker: EmbeddedBroker, topic: str, count: int) -> dict[str, Any]:
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
        batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
        if not batch:
            break
        seen += sum(len(r) for r in batch.values())
    elapsed = time.monotonic() - t0
    await consumer.stop()
    return {"records": seen, "events_per_s": round(seen / elapsed)}


async def count_only_agent(system: System, topic: str, count: int) -> dict[str, Any]:
    """A Faust agent that only counts, with the worker's broker settings, same records."""
    env = {
        **os.environ,
        "KAFKA_BROKER_URL": system.broker.url,
        "COUNT_TOPIC": topic,
        "APP_ID": f"{system.tag}-count-only",
        "PYTHONPATH": str(ROOT),
    }
    worker = WorkerProcess(env, system.workdir, "count-only", app="bench.count_agent").start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        assert worker.proc is not None
        meter = CpuMeter({"count_only_agent": worker.proc.pid, "broker": system.broker.pid or 0})
        meter.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            _, state = await asyncio.to_thread(worker.get, "/count")
            if state["counted"] >= count:
                break
            await asyncio.sleep(0.05)
        cpu = meter.split()
        seconds = max(1e-9, state["last"] - state["first"])
        return {
            "records": int(state["counted"]),
            "events_per_s": round(state["counted"] / seconds),
            "cpu": cpu,
        }
    finally:
        await asyncio.to_thread(worker.stop)


def _inbox_batch(shape: str, size: int, serial: Iterator[int]) -> list[Any]:
    batch = []
    for _ in range(size):
        n = next(serial)
        message = PushMessage(msg_id=10**12 + n, session_id=f"s{n % 997}", content="x" * 120)
        if shape == "1to1_pairs":
            batch.append((message, [f"inbox-a{n % 5000}", f"inbox-b{(n * 7) % 5000}"]))
        else:
            batch.append((message, [f"inbox-m{(n + i) % 20000}" for i in range(1000)]))
    return batch


async def _write_until(
    store: RedisInboxStore, deadline: float, shape: str, size: int, serial: Iterator[int]
) -> int:
    written = 0
    while time.monotonic() < deadline:
        result = await store.write(_inbox_batch(shape, size, serial))
        written += result.new + result.duplicate
    return written


async def inbox_store(seconds: float = 4.0, writers: int = 2) -> dict[str, Any]:
    """The inbox store alone: writes/s into one Redis, no Kafka (storage's ceiling).

    As storage writes: one call per fetched batch (500 deliveries of a 1:1 burst, or 10
    messages to 1000-member groups), `writers` storage consumers at once.
    """
    meter = CpuMeter()
    meter.watch("redis", redis_pid(REDIS_URL))
    meter.watch("bench_writers", os.getpid())
    out: dict[str, Any] = {}
    for shape, size in (("1to1_pairs", 500), ("group_1000", 10)):
        stores = [
            RedisInboxStore(REDIS_URL, max_entries=5000, message_ttl=600) for _ in range(writers)
        ]
        serial = iter(range(10**9))
        meter.start()
        t0 = time.monotonic()
        deadline = t0 + seconds
        counts = await asyncio.gather(
            *(_write_until(store, deadline, shape, size, serial) for store in stores)
        )
        elapsed = time.monotonic() - t0
        out[shape] = {
            "writes_per_s": round(sum(counts) / elapsed),
            "writers": writers,
            "cpu": meter.split(),
        }
        for store in stores:
            await store.close()
    return out


async def add_groups(system: System) -> dict[str, list[str]]:
    store = RedisMemberStore(REDIS_URL)
    groups = {f"{system.tag}-group-{g}": system.users[g * 200 : g * 200 + 1000] for g in range(5)}
    for session_id, members in groups.items():
        await store.add(session_id, members)
    await store.close()
    return groups


async def broker_hop(broker: EmbeddedBroker, rate: float, seconds: float) -> dict[str, Any]:
    """The broker's own floor: one bare produce -> consume hop at `rate`, nothing else.

    The worker's settings (Tansu profile): 2 ms linger, 20 ms fetch wait, 4 partitions.
    A 1:1 message takes two such hops (push-events, gateway-pushes) before its gRPC call.
    """
    topic = f"hop-{int(time.time() * 1000)}"
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=2)
    await producer.start()
    await producer.send_and_wait(topic, b"0", partition=0)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=20, group_id=None
    )
    await consumer.start()
    latencies: list[float] = []

    async def consume() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            latencies.extend((now - float(r.value)) * 1000 for rs in batch.values() for r in rs)

    reader = asyncio.create_task(consume())
    await asyncio.sleep(1)
    started, count = time.monotonic(), int(rate * seconds)
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await producer.send(topic, str(time.time()).encode(), partition=i % 4)
    await asyncio.sleep(1)
    reader.cancel()
    await producer.stop()
    await consumer.stop()
    return {
        "rate": round(rate),
        "records": len(latencies),
        "latency_ms_p50": pct(latencies, 0.5),
        "latency_ms_p99": pct(latencies, 0.99),
    }
