"""A token bucket per provider: requests per second, with a burst allowance."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """`acquire()` waits until a request may go. Waiters are served in arrival order.

    Each caller reserves its slot when it arrives (the bucket may go negative) and then
    sleeps until that slot. Slots follow from the bucket, not from when a sleeper happened
    to wake, so a late wake-up does not push every later request back: sleeping in turn
    behind a lock ran about 10% under 500/s and 18% under 1000/s.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = time.monotonic()

    def _reserve(self, n: int) -> float:
        """Take `n` tokens now; the seconds until they exist."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate)

    async def acquire(self, n: int = 1) -> None:
        if n < 1:
            raise ValueError("acquire at least one token")
        # No lock: reserving never awaits, so arrival order is slot order. A waiter that
        # is cancelled leaves its slot unused, which errs on the slow side.
        wait = self._reserve(n)
        if wait > 0:
            await asyncio.sleep(wait)


class Unlimited:
    async def acquire(self, n: int = 1) -> None:
        return None
