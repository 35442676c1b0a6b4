"""What every benchmark shares: processes to measure, their CPU and memory, percentiles.

The machine is small (2 cores) and shared by the broker, Redis, the load generator, the
gateway simulators and the worker, so every figure comes with the CPU each of them used
while it was measured: a ceiling the broker or the load generator sets is then named.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process so far, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)


def redis_pid(url: str) -> int | None:
    """The Redis server's pid, if it runs on this machine (it reports its own)."""
    try:
        info = redis.Redis.from_url(url).info("server")
    except redis.RedisError:
        return None
    pid = int(info.get("process_id", 0))
    return pid if Path(f"/proc/{pid}").exists() else None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class CpuMeter:
    """Cores used by each named process over a measured interval (1.0 = one core busy)."""

    pids: dict[str, int] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0

    def watch(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self.pids[name] = pid

    def forget(self, name: str) -> None:
        self.pids.pop(name, None)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {n: cpu_seconds(p) or 0.0 for n, p in self.pids.items()}

    def split(self) -> dict[str, Any]:
        wall = max(1e-9, time.monotonic() - self._t0)
        used = {
            name: round(((cpu_seconds(pid) or 0.0) - self._start.get(name, 0.0)) / wall, 2)
            for name, pid in self.pids.items()
        }
        return {"cores_used": used, "total": round(sum(used.values()), 2), "cores": os.cpu_count()}


Buckets = dict[str, dict[float, float]]  # label value -> {upper bound: cumulative count}


def histogram(metrics_url: str, name: str, label: str) -> Buckets:
    """One labelled Prometheus histogram of a worker, as scraped now."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    out: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                bound = float(sample.labels["le"])
                out.setdefault(sample.labels[label], {})[bound] = sample.value
    return out


def quantiles_ms(before: Buckets, after: Buckets, qs: tuple[float, ...]) -> dict[str, Any]:
    """Quantiles (ms) of what a histogram gained between two scrapes, per label value.

    Interpolated within a bucket: as coarse as the buckets (1, 2.5, 5, 10, 20, 50 ms...).
    """
    out: dict[str, Any] = {}
    for key, buckets in after.items():
        old = before.get(key, {})
        bounds = sorted(buckets)
        counts = [buckets[b] - old.get(b, 0.0) for b in bounds]
        total = counts[-1] if counts else 0
        if total <= 0:
            continue
        found: dict[str, Any] = {"samples": int(total)}
        for q in qs:
            want, lower, below = q * total, 0.0, 0.0
            for bound, count in zip(bounds, counts, strict=True):
                if count >= want:
                    if bound == float("inf"):
                        found[f"p{round(q * 100)}"] = f">{lower * 1000:g}"
                    else:
                        share = (want - below) / (count - below) if count > below else 1.0
                        found[f"p{round(q * 100)}"] = round(
                            (lower + (bound - lower) * share) * 1000, 1
                        )
                    break
                lower, below = bound, count
        out[key] = found
    return out
