"""How long a consumer's fetches wait on the broker: short while records flow, long at rest.

Tansu holds every fetch for its whole max wait, however soon records arrive (DESIGN.md
section 6), so the wait is what each hop costs in latency, and a consumer with nothing
to read asks the broker 1000/wait times a second. Measured here at rest with 2 ms waits
on three consumers: ~0.45 core in the worker and ~0.5 in Tansu, half the machine doing
nothing. So a consumer waits `busy_ms` while records keep coming and `idle_ms` once none
came for `hold` seconds: the first message after a quiet spell pays up to `idle_ms` a
hop, a steady stream pays `busy_ms`. Kafka answers a fetch as soon as records arrive, so
with it both waits are the same and this changes nothing.
"""

from __future__ import annotations

import time
from typing import Any

from resonance_task import compat


class FetchWait:
    def __init__(self, busy_ms: int, idle_ms: int, hold: float = 1.0) -> None:
        self.busy_ms = busy_ms
        self.idle_ms = max(idle_ms, busy_ms)
        self._hold = hold
        self._last_records = time.monotonic()
        self._current = busy_ms

    @property
    def current_ms(self) -> int:
        return self._current

    def observe(self, consumer: Any, got_records: bool) -> None:
        """After a fetch returned (or timed out): pick the wait of the next ones."""
        now = time.monotonic()
        if got_records:
            self._last_records = now
        wanted = self.busy_ms if now - self._last_records < self._hold else self.idle_ms
        if wanted != self._current and compat.set_fetch_max_wait(consumer, wanted):
            self._current = wanted
