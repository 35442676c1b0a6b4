"""A steady 1:1 load for the fault suite, and the exact accounting of what it must produce.

The load runs in the background at a fixed rate while a test injects its fault; `check`
then counts every inbox entry and every push: lost and duplicated inbox entries must be
zero, every push reaches its gateway or offline push, and duplicate pushes are reported.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

from resonance_task.commands.traffic import single_chat
from resonance_task.embedded.expectations import Expected, expected, received
from resonance_task.embedded.worker import WorkerProcess
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from tests.harness import Pipeline, eventually


async def users_online(
    p: Pipeline, worker: WorkerProcess, total: int, online: int, gateways: int
) -> tuple[list[str], list[str]]:
    """`total` users, the first `online` of them spread over `gateways` simulators."""
    users = [p.user(i) for i in range(total)]
    share = online // gateways
    for g in range(gateways):
        await p.gateway(f"gw-{g}", users[g * share : (g + 1) * share])
    await p.wait_online(worker, users[: share * gateways])
    return users, users[: share * gateways]


@dataclass
class Outcome:
    inbox_entries: int
    pushes: int
    duplicate_pushes: int
    offline_instead: int  # online recipients handed to offline push (a gateway failed them)

    @property
    def duplicate_ratio(self) -> float:
        return self.duplicate_pushes / max(1, self.pushes)


class Load:
    def __init__(
        self,
        p: Pipeline,
        users: list[str],
        online: list[str],
        count: int,
        rate: float,
        seed: int = 1,
    ) -> None:
        self.p = p
        self.users = users
        self.online = set(online)
        self.rate = rate
        rng = random.Random(seed)
        seqs: Counter[str] = Counter()
        self.events: list[PushEvent] = []
        for i in range(count):
            sender, recipient = rng.sample(users, 2)
            event = single_chat(sender, recipient, 0, f"load {i}")
            seqs[event.session_id] += 1
            event.seq_id = seqs[event.session_id]
            self.events.append(event)
        self.want: Expected = expected(self.events, {}, self.online)
        self.published = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Load:
        self._task = asyncio.create_task(self._produce())
        return self

    async def _produce(self, chunk: int = 250) -> None:
        started = time.monotonic()
        for start in range(0, len(self.events), chunk):
            await self.p.publish(self.events[start : start + chunk])
            self.published = min(len(self.events), start + chunk)
            ahead = self.published / self.rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def until_published(self, fraction: float) -> None:
        while self.published < fraction * len(self.events):
            if self._task is not None and self._task.done():
                self._task.result()
            await asyncio.sleep(0.05)

    async def finished(self) -> None:
        assert self._task is not None
        await self._task

    async def inbox_total(self) -> int:
        return sum([len(await self.p.inbox(u)) for u in self.users])

    async def check(self, seconds: float = 120) -> Outcome:
        """Wait for every inbox entry, then count exactly. Fails on any loss or inbox dup."""
        await self.finished()
        want = self.want

        async def all_stored() -> bool:
            return await self.inbox_total() >= want.inbox_total

        try:
            await eventually(all_stored, seconds, f"{want.inbox_total} inbox entries")
        except AssertionError as exc:
            # What a stall looks like from outside: how far it got, and each live worker's
            # stages and log, for the run that cannot be repeated.
            stored = await self.inbox_total()
            raise AssertionError(f"{exc}: {stored} stored; {self._workers()}") from exc
        for user in self.users:
            entries = await self.p.inbox(user)
            assert sorted(e.msg_id for e in entries) == sorted(want.inbox[user]), user
            assert [e.cursor for e in entries] == list(range(1, len(entries) + 1)), user

        # Every push reached its gateway or, failed by it, offline push: none lost.
        async def all_pushed() -> bool:
            got = received(self.p.sims)
            missing = sum(1 for u, ids in want.pushed.items() for m in ids if not got[u][m])
            return missing == 0 or missing <= len(await self._offline_instead())

        await eventually(all_pushed, seconds, f"{want.pushed_total} pushes")
        got = received(self.p.sims)
        offline = await self._offline_instead()
        for user, ids in want.pushed.items():
            for msg_id in ids:
                assert got[user][msg_id] or (user, msg_id) in offline, (user, msg_id)
        pushes = sum(sum(counts.values()) for counts in got.values())
        duplicates = sum(c - 1 for counts in got.values() for c in counts.values() if c > 1)
        return Outcome(want.inbox_total, pushes, duplicates, len(offline))

    def _workers(self) -> str:
        seen = []
        for worker in self.p.workers:
            if worker.proc is None or worker.proc.poll() is not None:
                continue
            try:
                _, stats = worker.get("/stats", timeout=5)
                stages = stats.get("stages") if isinstance(stats, dict) else stats
            except OSError as exc:
                stages = repr(exc)
            seen.append(f"{worker.name}: {stages}\n{worker.log_tail()}")
        return "\n".join(seen) or "no worker alive"

    async def _offline_instead(self) -> set[tuple[str, int]]:
        return {
            (user, record.message.msg_id)
            for record in await self.p.offline()
            if record.reason.startswith("gateway_")
            for user in record.users
        }
