"""Every benchmark of issue 8's table in one run, side by side, as one JSON document.

    python -m bench [--quick] [--only startup,1to1,...] [--no-save]

Scenarios, in order (each figure with the CPU every process used meanwhile):
- startup: worker start to ready, first delivery on an idle pipeline, idle RSS and CPU;
- 1to1: a burst of 1:1 messages end to end (every inbox write, every push), then on the
  same records a bare aiokafka consumer and a count-only Faust agent (the ceilings);
- latency: 1:1 at a steady half of the burst's rate, produce -> gateway receipt, and
  beside it one bare broker hop at the same rate (a message takes two);
- groups: messages to 1000-member groups, and the naive per-recipient design;
- inbox: the inbox store alone, writes/s into one Redis;
- two_workers: the 1:1 burst again with a second worker;
- large_group: one message to a 100k-member group, 10% online;
- presence: presence updates/s to routable in every worker's view, a 15,000-user
  reconnect storm to routable, and the view delay (published -> visible) p50/p99;
- routes: a worker holding a million online routes;
- tasks: no-op typed tasks/s on one worker, submit-to-start latency at 2,500/s, and
  100 high-priority tasks against a
  backlog of 10,000 low-priority ones.
The result is also written to bench/results/<UTC time>-<commit>.json.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench import pipeline, presence, tasks
from bench.harness import git_commit
from bench.large_group import VARIANTS, LargeGroupBench
from bench.loadgen import one_to_one_pairs
from bench.routes import million_routes
from resonance_task.commands.progress import progress
from resonance_task.commands.traffic import group_chat, single_chat
from resonance_task.embedded.broker import EmbeddedBroker

SCENARIOS = (
    "startup",
    "1to1",
    "latency",
    "groups",
    "inbox",
    "two_workers",
    "large_group",
    "presence",
    "routes",
    "tasks",
)
RESULTS = Path(__file__).resolve().parent / "results"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    redis.Redis.from_url(pipeline.REDIS_URL).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="resonance-bench-"))
    n = 5_000 if args.quick else args.one_to_one
    out: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "commit": git_commit()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": "cores_used: 1.0 = one core busy for the whole measurement",
    }
    bar = progress()
    chosen = [name for name in SCENARIOS if name in only]
    step = bar.add_task("bench: start", total=len(chosen))

    def begin(name: str) -> bool:
        """Whether scenario `name` runs; if so, the bar shows it."""
        if name not in only:
            return False
        bar.update(step, description=f"bench: {name}", completed=chosen.index(name))
        return True

    bar.start()
    try:
        return await _run(args, only, workdir, n, out, begin)
    finally:
        bar.update(step, completed=len(chosen), description="bench: done")
        bar.stop()


async def _run(
    args: argparse.Namespace,
    only: set[str],
    workdir: Path,
    n: int,
    out: dict[str, Any],
    begin: Callable[[str], bool],
) -> dict[str, Any]:
    with EmbeddedBroker(log_file=workdir / "tansu.log") as broker:
        system = pipeline.System(broker, workdir, "bench" + uuid.uuid4().hex[:6])
        try:
            _, ready_s = await system.start_worker("worker-1")
            await system.start_gateways()
            await system.wait_routed()
            if begin("startup"):
                out["startup"] = {
                    "worker_ready_s": round(ready_s, 2),
                    "first_delivery_ms": await pipeline.first_delivery(system),
                    "idle": await pipeline.idle_cost(system),
                }
            if only & {"1to1", "latency", "two_workers"}:
                begin("1to1")
                out["1to1"] = await pipeline.one_to_one(system, n, seed=1)
                topic = system.env["TOPIC_PUSH_EVENTS"]
                out["1to1_ceilings"] = {
                    "bare_aiokafka_consumer": await pipeline.bare_consumer(broker, topic, n),
                    "count_only_faust_agent": await pipeline.count_only_agent(system, topic, n),
                }
                top = out["1to1"]["events_per_s"]
                out["1to1_ratios"] = {
                    "over_count_only_faust_agent": round(
                        top / out["1to1_ceilings"]["count_only_faust_agent"]["events_per_s"], 3
                    ),
                    "over_bare_consumer": round(
                        top / out["1to1_ceilings"]["bare_aiokafka_consumer"]["events_per_s"], 3
                    ),
                }
            if begin("latency"):
                rate = args.latency_rate or out["1to1"]["events_per_s"] / 2
                seconds = 6 if args.quick else 15
                out["latency"] = await pipeline.steady(system, rate, seconds, 3)
                out["latency_broker_floor_one_hop"] = await pipeline.broker_hop(
                    broker, rate, seconds / 2
                )
            if begin("groups"):
                groups = await pipeline.add_groups(system)
                out["groups_1000"] = await pipeline.groups(
                    system, groups, 30 if args.quick else 150, 4
                )
                rng_events = [
                    single_chat(a, b, 1, "naive")
                    for a, b in one_to_one_pairs(system.users, 20_000, 5)
                ]
                group_events = [group_chat(groups[g][0], g, 1, "naive") for g in sorted(groups) * 4]
                budget = 8 if args.quick else 20
                out["naive_groups_1000"] = await pipeline.naive(
                    system, group_events, groups, budget
                )
                out["naive_1to1"] = await pipeline.naive(system, rng_events, {}, budget)
                out["groups_ratio_over_naive"] = round(
                    out["groups_1000"]["deliveries_per_s"]
                    / out["naive_groups_1000"]["deliveries_per_s"],
                    1,
                )
            if begin("inbox"):
                out["inbox_store"] = await pipeline.inbox_store(2 if args.quick else 5)
            if begin("tasks"):
                count = 2_000 if args.quick else 60_000
                out["tasks_noop"] = await tasks.noop_tasks(system, count)
                # Half the 5,000 a second, the rate its latency target is set at.
                out["tasks_paced"] = await tasks.paced(system, 2_500, 2 if args.quick else 10)
                out["tasks_priority"] = await tasks.priority(
                    system, 1_000 if args.quick else 10_000, 100
                )
            if begin("two_workers"):
                await system.start_worker("worker-2")
                await system.wait_routed()
                await asyncio.sleep(2)  # the groups have rebalanced: both workers hold partitions
                out["1to1_two_workers"] = await pipeline.one_to_one(system, n, seed=7)
                out["two_workers_over_one"] = round(
                    out["1to1_two_workers"]["events_per_s"] / out["1to1"]["events_per_s"], 2
                )
        finally:
            await system.stop()
        if begin("large_group"):
            bench = LargeGroupBench(broker, workdir, 20_000 if args.quick else 100_000, 0.1)
            try:
                out["large_group_setup"] = await bench.setup()
                out["large_group_100k"] = await bench.run("large_group", VARIANTS["large_group"], 1)
            finally:
                await bench.stop()
        if begin("presence"):
            out.update(await presence.run_on(broker, workdir, quick=args.quick))
        if begin("routes"):
            out["routes_1m"] = await million_routes(
                broker,
                workdir,
                pipeline.REDIS_URL,
                "routes" + uuid.uuid4().hex[:6],
                100_000 if args.quick else 1_000_000,
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small runs, to check the harness")
    parser.add_argument("--only", default="", help=f"comma-separated of {','.join(SCENARIOS)}")
    parser.add_argument("--one-to-one", type=int, default=60_000, help="1:1 burst size")
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=0.0,
        help="steady rate of the latency run (default: half the 1:1 burst's), to pair runs",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    sys.stdout.flush()
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        name = f"{result['at'].replace(':', '')}-{result['machine']['commit']}.json"
        (RESULTS / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
