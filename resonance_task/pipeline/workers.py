"""Which workers are alive and what each holds, for /api/v1/stats/workers.

Each worker writes its own entry every few seconds, with an expiry a few beats long, and
lists the others by reading theirs: a worker that dies (SIGKILL included) drops out when
its entry expires, without anyone having to tell. Redis rather than a Faust table: any
worker answers at once, and a worker that is gone must not be remembered in a changelog.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from mode import Service

from resonance_task.errors import is_transient
from resonance_task.stores.redis_client import connect

log = logging.getLogger(__name__)


def worker_name() -> str:
    """This worker's name wherever one is shown (task statuses, the workers view)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerDirectory(Service):
    def __init__(
        self,
        url: str,
        app_id: str,
        worker: str,
        describe: Callable[[], dict[str, Any]],
        *,
        interval: float = 2.0,
        timeout: float = 2.0,
        **kwargs: Any,
    ) -> None:
        self._redis = connect(url, timeout=timeout, decode_responses=True)
        self._index = f"{app_id}:workers"
        self._prefix = f"{app_id}:worker:"
        self.worker = worker
        self._describe = describe
        self.interval = interval
        self._started_at = int(time.time() * 1000)
        super().__init__(**kwargs)

    async def beat(self) -> None:
        """Write this worker's entry. A failed write waits for the next beat: an error here
        must never stop the worker (a key another hand clobbered is logged, not raised)."""
        entry = {
            "worker": self.worker,
            "started_at": self._started_at,
            "seen_at": int(time.time() * 1000),
            **self._describe(),
        }
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(
                    self._prefix + self.worker,
                    json.dumps(entry, default=str),
                    px=int(self.interval * 3000),
                )
                pipe.sadd(self._index, self.worker)
                await pipe.execute()
        except Exception as exc:
            if is_transient(exc):
                log.debug("worker entry not written: %r", exc)
            else:
                log.error("worker entry not written (%s): %r", self._index, exc)

    async def leave(self) -> None:
        """At a clean stop: gone now, not when the entry expires (else: when it expires)."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._prefix + self.worker)
                pipe.srem(self._index, self.worker)
                await pipe.execute()
        except Exception as exc:
            log.warning("worker entry not removed, it expires instead: %r", exc)
        finally:
            await self._redis.aclose()

    async def workers(self) -> list[dict[str, Any]]:
        members: set[str] = await self._redis.smembers(self._index)  # type: ignore[assignment]
        names = sorted(members)
        if not names:
            return []
        entries = await self._redis.mget([self._prefix + name for name in names])
        gone = [name for name, entry in zip(names, entries, strict=True) if entry is None]
        if gone:
            await self._redis.srem(self._index, *gone)
        found = []
        for name, entry in zip(names, entries, strict=True):
            if entry is None:
                continue
            try:
                found.append(json.loads(entry))
            except ValueError:
                log.warning("worker entry %s is not JSON: skipped", name)
        return found

    @Service.task
    async def _beating(self) -> None:
        while not self.should_stop:
            await self.beat()
            await self.sleep(self.interval)

    async def on_stop(self) -> None:
        await self.leave()
