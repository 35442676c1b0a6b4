"""/ready: a worker that cannot see every gateway and online user yet is not ready."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from resonance_task.pipeline.retry import retrying, stalls
from resonance_task.web.views import readiness
from tests.kafka import until


def fake_app(*, recovered: bool = True, rebalancing: bool = False) -> Any:
    completed = asyncio.Event()
    if recovered:
        completed.set()
    recovery = SimpleNamespace(completed=completed, in_recovery=False)
    return SimpleNamespace(tables=SimpleNamespace(recovery=recovery), rebalancing=rebalancing)


def topology(
    *,
    joined: bool = True,
    heartbeats: bool = True,
    routes: bool = True,
    stage_alive: bool = True,
    view_alive: bool = True,
    fence: bool = True,
) -> Any:
    stages = [
        SimpleNamespace(stage=name, joined=joined, alive=stage_alive) for name in ("fanout", "push")
    ]
    views = [
        SimpleNamespace(topic="heartbeats", caught_up=heartbeats, alive=view_alive),
        SimpleNamespace(topic="routes-changelog", caught_up=routes, alive=True),
    ]
    settings = SimpleNamespace(ready_stall_seconds=1.0)
    return SimpleNamespace(
        stages=stages, topic_views=views, settings=settings, fence=SimpleNamespace(fresh=fence)
    )


def test_ready_when_everything_is_in_place() -> None:
    ok, checks = readiness(fake_app(), topology())
    assert ok and all(checks.values())
    assert set(checks) >= {"fanout_joined", "push_joined", "view_caught_up:heartbeats"}


def test_not_ready_before_the_gateways_view_caught_up() -> None:
    ok, checks = readiness(fake_app(), topology(heartbeats=False))
    assert not ok and checks["view_caught_up:heartbeats"] is False


def test_not_ready_before_the_routes_view_caught_up_or_groups_joined() -> None:
    assert not readiness(fake_app(), topology(routes=False))[0]
    assert not readiness(fake_app(), topology(joined=False))[0]
    assert not readiness(fake_app(recovered=False), topology())[0]
    assert not readiness(fake_app(rebalancing=True), topology())[0]


def test_not_ready_before_the_routes_view_covers_the_presence_upstream() -> None:
    ok, checks = readiness(fake_app(), topology(fence=False))
    assert not ok and checks["presence_fence_covered"] is False


def test_not_ready_when_a_stage_or_a_view_stopped_running() -> None:
    ok, checks = readiness(fake_app(), topology(stage_alive=False))
    assert not ok and checks["fanout_alive"] is False
    ok, checks = readiness(fake_app(), topology(view_alive=False))
    assert not ok and checks["view_alive:heartbeats"] is False


async def test_not_ready_while_a_store_is_retried_longer_than_the_limit() -> None:
    async def away() -> None:
        raise ConnectionError("refused")

    task = asyncio.create_task(retrying(away, "inbox write", max_delay=0.05))
    try:
        await until(lambda: "inbox write" in stalls())
        ok, checks = readiness(fake_app(), topology())
        assert ok and checks["not_stalled:inbox write"] is True  # under READY_STALL_SECONDS
        await until(lambda: not readiness(fake_app(), topology())[0], seconds=5)
        ok, checks = readiness(fake_app(), topology())
        assert not ok and checks["not_stalled:inbox write"] is False
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ok, checks = readiness(fake_app(), topology())
    assert ok and "not_stalled:inbox write" not in checks
