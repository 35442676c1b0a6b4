"""The one error policy: what an exception means, and how long to wait before trying again.

Every stage, agent, store call and task run asks `classify(exc)` one question, "will
trying again help?", and gets one of three answers:

- `Transient`: the other side cannot answer now and will (a connection, a timeout, a
  busy or loading Redis, a cluster failing over, a moving partition leader). Wait with
  `BACKOFF` and try again, holding the batch and its partition back: Kafka is the buffer
  while a store is away. Never dead-lettered.
- `Poison(reason)`: this record, recipient or task is wrong and will be as wrong next time
  (undecodable, invalid, a key of the wrong type, a group that cannot be paged, a payload
  refused). Dead-letter the one thing it concerns at once, with the reason; the rest
  moves on.
- `Permanent(reason)`: neither is known (a bug, or a refusal nobody named): tried
  `ATTEMPTS` times, then set aside like poison. A task's run has its own attempt budget
  (`max_attempts`), spent through its retry topics.

An exception says which it is by its class (`PoisonError`, `TransientError`), by a
`transient = True` attribute, or by being one the libraries already classify
(aiokafka's `retriable`, redis-py's connection and timeout errors, Redis's replies).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError, KafkaTimeoutError
from redis.exceptions import ClusterDownError, MasterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resonance_task.pipeline import metrics

log = logging.getLogger(__name__)

ATTEMPTS = 3  # tries of an error that is neither transient nor poison, before it is set aside


@dataclass(frozen=True, slots=True)
class Transient:
    reason: str


@dataclass(frozen=True, slots=True)
class Permanent:
    reason: str


@dataclass(frozen=True, slots=True)
class Poison:
    reason: str


Verdict = Transient | Permanent | Poison


class PoisonError(Exception):
    """Raised about one record, recipient or task: set it aside now, with `reason` (a
    short machine code, the dead-letter header), never retried."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class TransientError(Exception):
    """Raised when the other side, or its configuration, may be right later: waited out."""


def classify(exc: BaseException) -> Verdict:
    """Transient, poison or permanent: the one place that decides."""
    if isinstance(exc, PoisonError):
        return Poison(exc.reason)
    if isinstance(exc, TransientError) or getattr(exc, "transient", False):
        return Transient(type(exc).__name__)
    # Python 3.11: ConnectionError and asyncio's TimeoutError are OSErrors too.
    if isinstance(exc, (OSError, RedisConnectionError, RedisTimeoutError, KafkaTimeoutError)):
        return Transient(type(exc).__name__)
    # A Redis Cluster failing over, resharding or without a slot's node for a moment.
    if isinstance(exc, (ClusterDownError, TryAgainError, MasterDownError)):
        return Transient(type(exc).__name__)
    if isinstance(exc, RedisResponseError):
        reply = redis_reply(exc)
        code = reply.split(" ", 1)[0]
        if reply.startswith(_REDIS_TRANSIENT_REPLIES):
            return Transient(f"redis_{code.lower()}")
        if code == "WRONGTYPE":
            return Poison("wrong_type")  # a key another writer gave another type
        return Permanent(f"redis_{code.lower()}" if code.isupper() else "redis_error")
    if isinstance(exc, KafkaError):
        if getattr(exc, "retriable", False):
            return Transient(type(exc).__name__)
        return Permanent(type(exc).__name__)
    # asyncpg is imported only when configured: judge its errors by class, not import.
    if any(
        cls.__module__.startswith("asyncpg") and cls.__name__ in _ASYNCPG_TRANSIENT
        for cls in type(exc).__mro__
    ):
        return Transient(type(exc).__name__)
    return Permanent(type(exc).__name__)


def is_transient(exc: BaseException) -> bool:
    return isinstance(classify(exc), Transient)


# Redis answers these while it cannot serve now but will: a script running too long, a
# cluster resharding or failing over, a replica not yet promoted, memory full until
# keys expire. Every other error reply (WRONGTYPE, CROSSSLOT, a script error) is final.
_REDIS_TRANSIENT_REPLIES = (
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "LOADING",
    "OOM",
)

_ASYNCPG_TRANSIENT = (
    "PostgresConnectionError",
    "ConnectionDoesNotExistError",
    "TransactionRollbackError",  # serialization failure, deadlock: the next try may pass
    "TooManyConnectionsError",
    "CannotConnectNowError",
)


def redis_reply(exc: BaseException) -> str:
    """A Redis error reply as the server said it, without redis-py's pipeline preamble
    ("Command # 1 (<the command, arguments and all>) of pipeline caused error: ...")."""
    text = str(exc.args[0]) if exc.args else str(exc)
    _, found, reply = text.partition(" of pipeline caused error: ")
    # The reply comes as the repr of the original error's args: ('WRONGTYPE ...',)
    return reply.lstrip("('\"") if found else text


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter, capped: the one formula every wait uses.

    The n-th wait (n from 1) is drawn from [jitter, 1] x min(cap, first x 2^(n-1)):
    spread, so that workers that failed together do not come back together, and never
    much shorter than the step, so that a peer that is down is not hammered.
    """

    first: float = 0.05
    cap: float = 5.0
    jitter: float = 0.5

    def delay(self, attempt: int) -> float:
        step = min(self.cap, self.first * 2.0 ** max(0, attempt - 1))
        return step * random.uniform(self.jitter, 1.0)

    def capped(self, cap: float) -> Backoff:
        return Backoff(self.first, cap, self.jitter)


BACKOFF = Backoff()


def record(stage: str, exc: BaseException) -> Verdict:
    """Classify and count an error met by `stage`: what every stage's catch-all calls."""
    verdict = classify(exc)
    metrics.ERRORS.labels(stage, type(verdict).__name__.lower()).inc()
    return verdict


async def on_agent_error(agent: Any, exc: BaseException) -> None:
    """Faust's `on_error` for every agent: the agent's error, counted and logged by what it
    is. Faust then restarts the agent (its supervisor), which resumes from the last
    committed offset: a transient error is waited out that way, as everywhere."""
    name = getattr(agent, "name", None) or type(agent).__name__
    verdict = record(f"agent:{name}", exc)
    log.error("agent %s crashed (%s: %s): %r", name, type(verdict).__name__, verdict.reason, exc)
