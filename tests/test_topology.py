"""The composition root, in-process: build(settings) makes a whole worker from its settings
alone, as many times as asked, without starting anything."""

from __future__ import annotations

from typing import Any

from resonance_task.pipeline.faust_agent import Agent
from resonance_task.settings import Settings
from resonance_task.topology import build

MESSAGE_PATH = {"fanout", "presence", "routes", "push", "storage"}


def settings(app_id: str, **overrides: Any) -> Settings:
    return Settings.model_validate(
        {
            "app_id": app_id,
            "kafka_broker_url": "kafka://127.0.0.1:9",
            "redis_url": "redis://127.0.0.1:9/0",
            **overrides,
        }
    )


async def test_two_workers_built_side_by_side_from_their_settings() -> None:
    plain = build(settings("t-plain", tasks_enabled=False))
    tasks = build(settings("t-tasks", tasks_enabled=True, topic_partitions=8))
    assert plain.app is not tasks.app
    assert plain.app.conf.id == "t-plain" and tasks.app.conf.topic_partitions == 8
    assert {s.stage for s in plain.stages} == MESSAGE_PATH and plain.task_side is None
    names = {s.stage for s in tasks.stages}
    assert MESSAGE_PATH | {"task_intake", "task_retry", "task_high", "task_low"} <= names
    # Every stage reads in a consumer group of its own, named after its app.
    groups = [s.options.group for s in tasks.stages]
    assert len(set(groups)) == len(groups) and all(g.startswith("t-tasks-") for g in groups)
    # The Faust agents crash through the error policy (pipeline/faust_agent.py).
    assert set(plain.app.agents) == {"large_group", "registry"}
    assert all(isinstance(agent, Agent) for agent in plain.app.agents.values())
    # The web routes of each app are its own.
    assert plain.inspect.settings.app_id == "t-plain"


async def test_each_service_is_added_after_and_stops_before_what_it_needs() -> None:
    built = build(settings("t-order", tasks_enabled=True))
    at = {id(service): i for i, service in enumerate(built.services)}
    stage = {s.stage: at[id(s)] for s in built.stages}
    gateways_view, routes_view = (at[id(v)] for v in built.inspect.topic_views)
    fence = at[id(built.inspect.fence)]
    # Fanout stops feeding push before push drains its gateways; the views it routes with
    # and the fence stop after it; push stops before the gateways view it sends by.
    assert stage["fanout"] > max(stage["push"], stage["storage"], fence, routes_view)
    assert stage["push"] > gateways_view and fence > routes_view
    assert type(built.services[-1]).__name__ == "WorkerDirectory"  # describes every stage
    assert len(at) == len(built.services)
