"""The one error policy: what each error is, the one backoff, and retrying by them."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from aiokafka.errors import NotLeaderForPartitionError, RecordTooLargeError
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from resonance_task.errors import (
    ATTEMPTS,
    Backoff,
    Permanent,
    Poison,
    Transient,
    classify,
    on_agent_error,
)
from resonance_task.pipeline.dlq import InvalidRecord
from resonance_task.pipeline.faust_agent import Agent
from resonance_task.pipeline.metrics import ERRORS
from resonance_task.pipeline.retry import retrying
from resonance_task.stores.members import UnpageableGroup
from resonance_task.stores.postgres import MemberTableError
from resonance_task.tasks import PermanentError
from resonance_task.tasks.payload import PayloadInvalid

PIPELINE_WRONGTYPE = (
    "Command # 1 (EVALSHA abc 2 inbox:{u1} seq:{u1}) of pipeline caused error: "
    "('WRONGTYPE Operation against a key holding the wrong kind of value',)"
)


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (ConnectionRefusedError(), Transient("ConnectionRefusedError")),
        (TimeoutError(), Transient("TimeoutError")),
        (RedisConnectionError("reset"), Transient("ConnectionError")),
        (ResponseError("LOADING Redis is loading the dataset"), Transient("redis_loading")),
        (ResponseError("CLUSTERDOWN The cluster is down"), Transient("redis_clusterdown")),
        (ResponseError("READONLY You can't write against a replica"), Transient("redis_readonly")),
        (ResponseError(PIPELINE_WRONGTYPE), Poison("wrong_type")),
        (ResponseError("CROSSSLOT Keys in request don't hash"), Permanent("redis_crossslot")),
        (ResponseError("user_script:1: bad"), Permanent("redis_error")),
        (ClusterDownError("no node serves the slot"), Transient("ClusterDownError")),
        (TryAgainError("resharding"), Transient("TryAgainError")),
        (NotLeaderForPartitionError(), Transient("NotLeaderForPartitionError")),
        (RecordTooLargeError(), Permanent("RecordTooLargeError")),
        (InvalidRecord("decode_error", "not a PushEvent"), Poison("decode_error")),
        (UnpageableGroup("member_key_wrong_type", "a hash"), Poison("member_key_wrong_type")),
        (PermanentError("refused by the moderation service"), Poison("permanent_error")),
        (PayloadInvalid(["period_end"], "required"), Poison("permanent_error")),
        (MemberTableError("no such column"), Transient("MemberTableError")),
        (KeyError("a bug"), Permanent("KeyError")),
    ],
)
def test_classify(exc: BaseException, verdict: object) -> None:
    assert classify(exc) == verdict


def test_backoff_doubles_up_to_its_cap_and_spreads_within_the_step() -> None:
    backoff = Backoff(first=0.1, cap=1.0, jitter=0.5)
    for attempt, step in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (50, 1.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(step * 0.5 <= d <= step for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > step * 0.2  # jittered, not one value


async def _calls_until_raised(exc: Exception) -> int:
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise exc

    with pytest.raises(type(exc)):
        await retrying(fail, "test", max_delay=0.001)
    return calls


async def test_retrying_raises_poison_at_once_and_a_permanent_error_after_attempts() -> None:
    assert await _calls_until_raised(InvalidRecord("invalid", "no msg_id")) == 1
    assert await _calls_until_raised(KeyError("a bug")) == ATTEMPTS


async def test_retrying_waits_out_a_transient_error() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 6:  # more than ATTEMPTS: transient errors are not counted against it
            raise RedisConnectionError("reset")
        return "written"

    assert await retrying(flaky, "test", max_delay=0.001) == "written"
    assert calls == 6


async def test_a_faust_agents_error_is_counted_by_its_verdict() -> None:
    class Agent:
        name = "registry"

    counter = ERRORS.labels("agent:registry", "poison")
    before = counter._value.get()
    await on_agent_error(Agent(), InvalidRecord("invalid", "no gateway_id"))
    await asyncio.sleep(0)
    assert counter._value.get() == before + 1


async def test_the_apps_agent_class_sends_a_crash_through_the_policy_then_to_faust() -> None:
    seen: list[BaseException] = []

    async def fausts_own(agent: object, exc: BaseException) -> None:
        seen.append(exc)

    app = faust.App("errors-test", broker="kafka://127.0.0.1:1", store="memory://", Agent=Agent)
    crashes: Any = app.agent(name="crashes")(_consume)
    # What Faust's supervisor calls when the agent raises (faust/agents/agent.py).
    on_error: Any = Agent(_consume, app=app, name="crashes", on_error=fausts_own)._on_error
    counter = ERRORS.labels("agent:crashes", "transient")
    before = counter._value.get()
    await on_error(crashes, ConnectionResetError())
    assert counter._value.get() == before + 1 and isinstance(seen[0], ConnectionResetError)
    # Faust clones agents with their settings: the policy is not applied twice.
    assert crashes.clone()._on_error is crashes._on_error


async def _consume(stream: Any) -> None:
    async for _ in stream:
        pass
