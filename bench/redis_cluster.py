"""Inbox writes/s on one Redis against a Redis Cluster, side by side in one run.

    python -m bench.redis_cluster [--seconds 4] [--writers 4] [--rounds 2]

Each backend is started fresh for the run, on loopback, nothing on disk: one
redis-server; a cluster of 3 masters (no replicas: what the writes cost, not the
replication); a cluster of one master (what the cluster client itself costs). The
writers write as the storage stage does (one call per fetched batch: 500 deliveries of
a 1:1 burst, or 10 messages to 1000-member groups), `writers` of them at once in this
process. Rounds alternate the backends, so the machine's noise falls on all of them.
Every figure carries the CPU each redis-server and the writers used: on 2 cores, the
writers and three servers share them, so writes per Redis-core is given too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from bench.harness import CpuMeter, git_commit
from bench.pipeline import _write_until
from resonance_task.embedded.redis import LocalRedis, LocalRedisCluster
from resonance_task.stores.inbox import RedisInboxStore

SHAPES = (("1to1_pairs", 500), ("group_1000", 10))


def _backends() -> dict[str, AbstractContextManager[Any]]:
    return {
        "one_redis": LocalRedis(),
        "cluster_3_masters": LocalRedisCluster(masters=3, replicas=0),
        "cluster_1_master": LocalRedisCluster(masters=1, replicas=0),
    }


def _pids(backend: Any) -> dict[str, int]:
    if isinstance(backend, LocalRedisCluster):
        pairs = zip(backend.ports, backend.nodes, strict=True)
        return {f"redis:{port}": proc.pid for port, proc in pairs}
    assert backend._proc is not None
    return {"redis": backend._proc.pid}


async def _measure(url: str, pids: dict[str, int], seconds: float, writers: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shape, size in SHAPES:
        meter = CpuMeter()
        for name, pid in pids.items():
            meter.watch(name, pid)
        meter.watch("writers", os.getpid())
        stores = [RedisInboxStore(url, max_entries=5000, message_ttl=600) for _ in range(writers)]
        serial: Iterator[int] = iter(range(10**9))
        meter.start()
        t0 = time.monotonic()
        counts = await asyncio.gather(
            *(_write_until(s, t0 + seconds, shape, size, serial) for s in stores)
        )
        elapsed = time.monotonic() - t0
        cpu = meter.split()
        redis_cores = sum(v for k, v in cpu["cores_used"].items() if k.startswith("redis"))
        rate = sum(counts) / elapsed
        out[shape] = {
            "writes_per_s": round(rate),
            "writes_per_redis_core": round(rate / redis_cores) if redis_cores else None,
            "cpu": cpu,
        }
        for store in stores:
            await store.close()
    return out


async def run(seconds: float, writers: int, rounds: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for name, backend in _backends().items():
            with backend as running:
                results.setdefault(name, []).append(
                    await _measure(running.url, _pids(running), seconds, writers)
                )
    summary: dict[str, Any] = {}
    for shape, _ in SHAPES:
        best = {name: max(r[shape]["writes_per_s"] for r in runs) for name, runs in results.items()}
        summary[shape] = {
            "best_writes_per_s": best,
            "cluster_3_over_one": round(best["cluster_3_masters"] / best["one_redis"], 2),
            "cluster_1_over_one": round(best["cluster_1_master"] / best["one_redis"], 2),
        }
    return {
        "machine": {"cores": os.cpu_count(), "commit": git_commit()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": seconds,
        "writers": writers,
        "summary": summary,
        "runs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    json.dump(asyncio.run(run(args.seconds, args.writers, args.rounds)), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
