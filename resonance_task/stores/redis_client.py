"""Every Redis client the worker makes, made here: one set of timeouts and one retry.

A dropped connection is retried in the client first, a couple of times with redis-py's
own jittered backoff (`redis.retry.Retry`): a pooled connection the server closed costs a
reconnect, not a failed batch. A timeout is not retried here: Redis is slow or paused,
and three waits of `timeout` would hold a web request past its caller's patience (the
API answers 503 within the timeout). What outlasts either is the error policy's to wait
out (resonance_task.errors: transient, retried by the stage for as long as it lasts).
Re-sending is safe for every store here: their writes are idempotent (inbox appends by
msg_id, status moves by expected state, marks and heartbeats as sets).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

RETRIES = 2  # in the client, before the error reaches the stage
_ERRORS = (RedisConnectionError, ConnectionResetError)


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.02, cap=0.5)


def _options(timeout: float, decode_responses: bool) -> dict[str, Any]:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": decode_responses,
        "retry": AsyncRetry(_backoff(), RETRIES, supported_errors=_ERRORS),
    }


def connect(url: str, *, timeout: float, decode_responses: bool = False) -> aioredis.Redis:
    """An asyncio client (a pool) for `url` (redis://, rediss://, unix://)."""
    # A connection idle that long is checked before use.
    return aioredis.from_url(url, health_check_interval=30, **_options(timeout, decode_responses))


def connect_sync(url: str, *, timeout: float) -> redis.Redis:
    """A blocking client, for a thread of its own (the offset marks' writer)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(_backoff(), RETRIES, supported_errors=_ERRORS),
        health_check_interval=30,
    )


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster(url: str) -> bool:
    """A `redis+cluster://host:port` (or `rediss+cluster://`) URL names a Redis Cluster by
    any of its nodes; a plain `redis://` URL names one server."""
    return url.startswith(CLUSTER_SCHEMES)


def connect_cluster(url: str, *, timeout: float, decode_responses: bool = False) -> RedisCluster:
    """redis-py's cluster client for a node's URL (`redis+cluster://` or plain): it learns
    the slot map from that node, follows MOVED and ASK, and sends a pipeline's commands
    to each node in one round trip."""
    plain = url.replace("+cluster://", "://", 1)
    return RedisCluster.from_url(plain, **_options(timeout, decode_responses))
