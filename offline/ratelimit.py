"""A token bucket per provider: requests per second, with a burst allowance."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """`acquire()` waits until a request may go. Waiters are served in arrival order."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        # One waiter at a time computes its wait; the lock keeps arrival order (fairness)
        # and stops two waiters from spending the same token.
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._tokens = 1.0
                self._at = time.monotonic()
            self._tokens -= 1


class Unlimited:
    async def acquire(self) -> None:
        return None
