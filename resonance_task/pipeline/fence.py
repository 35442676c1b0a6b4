"""The presence fence: fan-out routes nothing with a view missing presence already in Kafka.

Presence reaches a worker's routes view through stages: presence -> [presence] ->
presence-by-user -> [routes] -> the routes changelog -> the view. A view caught up with
its own topic at one instant can still lack what is on its way through those hops (a
worker starting on a backlog of presence routed its first messages with a view that had
not seen it, and sent online users to offline push). The fence follows the records:
where the presence topic ends now; until the presence stage's group has committed past
that (it commits only what the broker has acknowledged downstream); then where
presence-by-user ends, until the routes stage's group has committed past it; then where
the changelog ends, until this worker's view has read that far. Every group's committed
offsets are the group's, whichever worker runs its partitions, so the fence holds with
any number of workers.

It is held again whenever fan-out's partitions move: the stages upstream rebalance at
the same time, and a partition's new owner may still be taking over its backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mode import Service

from resonance_task.errors import BACKOFF
from resonance_task.pipeline import metrics
from resonance_task.pipeline.backlog import OffsetProbe
from resonance_task.pipeline.topic_view import TopicView

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Hop:
    """A topic and the consumer group that takes its records on to the next hop, which
    commits only once what it produced from them is acknowledged."""

    topic: str
    group: str


class Fence(Service):
    def __init__(
        self,
        *,
        hops: Sequence[Hop],
        view: TopicView,
        probe: OffsetProbe,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        self._hops = list(hops)
        self._timeout = timeout
        self._view = view
        self._probe = probe
        self._fresh = asyncio.Event()
        # Held n times, covered as of the m-th: fresh while m == n. Held from the start.
        self._held = 1
        self._covered = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.covers = 0
        self.last_cover_s: float | None = None
        super().__init__(**kwargs)

    @property
    def fresh(self) -> bool:
        return self._fresh.is_set()

    def hold(self) -> None:
        """Something upstream may have moved: cover again before routing on."""
        self._held += 1
        self._fresh.clear()
        self._wake.set()

    async def wait_covered(self) -> bool:
        """Until the view covers the presence topic as of the last hold; False on timeout.

        The first cover is waited for however long it takes, as a worker is not ready
        before it; later ones (after a rebalance) for `timeout`: a stage upstream that
        cannot move (its broker partition away) must not stop fan-out for good, and
        routing on with a view a few seconds stale costs offline pushes, not messages.
        """
        if self._fresh.is_set():
            return True
        timeout = self._timeout if self.covers else None
        try:
            await asyncio.wait_for(self._fresh.wait(), timeout)
        except TimeoutError:
            metrics.FENCE_TIMEOUTS.inc()
            log.warning(
                "presence fence not covered after %ss: routing on with the view as it is",
                timeout,
            )
            return False
        return True

    def stats(self) -> dict[str, Any]:
        return {"fresh": self.fresh, "covers": self.covers, "last_cover_s": self.last_cover_s}

    async def on_start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence-fence")

    async def on_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while True:
            if self._covered == self._held:
                self._wake.clear()
                await self._wake.wait()
                continue
            held = self._held
            started = time.monotonic()
            try:
                await self.cover()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The broker away or a topic not there yet: ask again, still held.
                failures += 1
                log.warning("presence fence: %r; trying again", exc)
                await asyncio.sleep(BACKOFF.capped(2.0).delay(failures))
                continue
            failures = 0
            self.covers += 1
            self.last_cover_s = round(time.monotonic() - started, 3)
            metrics.FENCE_SECONDS.observe(self.last_cover_s)
            self._covered = held
            if held == self._held:
                self._fresh.set()

    async def cover(self) -> None:
        """Returns once the view holds everything the first hop's topic held when called."""
        ends = await self._probe.ends(self._hops[0].topic)
        for i, hop in enumerate(self._hops):
            await self._committed_past(hop, ends)
            following = self._hops[i + 1].topic if i + 1 < len(self._hops) else self._view.topic
            ends = await self._probe.ends(following)
        await self._view.wait_positions(ends)

    async def _committed_past(self, hop: Hop, ends: dict[int, int]) -> None:
        todo = {p: end for p, end in ends.items() if end > 0}
        if not todo:
            return
        # Nothing committed yet reads as 0: below the first offset kept, that is as done.
        begins = await self._probe.beginnings(hop.topic, todo)
        todo = {p: end for p, end in todo.items() if end > begins.get(p, 0)}
        while todo:
            committed = await self._probe.committed(hop.group, hop.topic, todo)
            todo = {p: end for p, end in todo.items() if committed[p] < end}
            if todo:
                await asyncio.sleep(POLL_SECONDS)
