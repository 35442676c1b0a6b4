"""The typed-task side of a worker, built from settings: topics, stages, status, runner."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from resonance_task.pipeline import backlog
from resonance_task.pipeline.dlq import DeadLetters, dlq_topic
from resonance_task.pipeline.transport import SendRecord
from resonance_task.pipeline.workers import worker_name
from resonance_task.settings import Settings
from resonance_task.stage.options import OptionsFor
from resonance_task.tasks import builtins, ratelimit
from resonance_task.tasks.envelope import TIMEOUT_MS_LIMIT
from resonance_task.tasks.periodic import Periodic, PeriodicTasks
from resonance_task.tasks.ratelimit import RateLimits
from resonance_task.tasks.registry import Registry, registry
from resonance_task.tasks.reports import StatsReport
from resonance_task.tasks.runner import START_NOW_MAX_SECONDS, RunnerConfig, TaskRunner
from resonance_task.tasks.scheduler import Scheduler
from resonance_task.tasks.stages import LANES, Lanes, TaskIntake, TaskLane, TaskRetry, submit
from resonance_task.tasks.status import TaskStatuses


@dataclass
class TaskSide:
    registry: Registry
    statuses: TaskStatuses
    lanes: Lanes
    scheduler: Scheduler
    runner: TaskRunner
    intake: TaskIntake
    lane_stages: list[TaskLane]
    retry: TaskRetry
    topics: list[Any]  # every topic of the task side, to create at start
    first_retry: SendRecord  # where a task asked to run again goes (DLQ replay, retry)
    dead_letter_topic: str
    partitions: int  # of each task topic
    periodic: PeriodicTasks  # what the leader submits every so often
    stats_topic: str  # where stats_report publishes

    @property
    def stages(self) -> list[Any]:
        return [self.intake, *self.lane_stages, self.retry]


def load_processors(
    settings: Settings,
    into: Registry = registry,
    *,
    send_verdict: SendRecord | None = None,
    offline_pusher: Any = None,
    inbox_archive: Any = None,
    stats_report: Any = None,
) -> Registry:
    """The built-ins, plugins' entry points and TASK_PROCESSOR_MODULES, into `into`;
    content_audit publishes its verdicts with `send_verdict`."""
    if "noop" not in into.types():
        builtins.register(
            into,
            audit_url=settings.task_audit_url,
            send_verdict=send_verdict,
            audit_timeout=settings.task_audit_timeout_seconds,
            offline_pusher=offline_pusher,
            inbox_archive=inbox_archive,
            stats_report=stats_report,
        )
    into.load_entry_points()
    for name in filter(None, (m.strip() for m in settings.task_processor_modules.split(","))):
        importlib.import_module(name)  # its @processor decorators register into `registry`
    return into


def retry_topic_names(settings: Settings) -> list[str]:
    """One retry topic per TASK_RETRY_DELAYS_MS delay; the first is where runs asked by
    hand go (API retry, DLQ replay)."""
    return [
        settings.topic_name(f"tasks-retry-{k}")
        for k in range(1, len(settings.task_retry_delays) + 1)
    ]


def task_side(
    settings: Settings,
    *,
    topic: Callable[[str], Any],
    producer_for: Callable[[Any], SendRecord],
    dead_letters: DeadLetters,
    options_for: OptionsFor,
    offline_pusher: Any = None,
    inbox_archive: Any = None,
    report_topics: Mapping[str, Sequence[str]] | None = None,
) -> TaskSide:
    verdicts = topic(settings.topic_audit_verdicts)
    stats_topic = topic(settings.topic_stats_hourly)
    statuses = TaskStatuses.from_settings(settings)
    dead_letter_topic = dlq_topic(settings.topic_tasks)
    submitted = topic(settings.topic_tasks)

    async def end_offsets(topics: list[str]) -> dict[tuple[str, int], int]:
        return await backlog.end_offsets(intake.kafka_consumer, topics)

    stats_report = StatsReport(
        topics={
            **(report_topics or {}),
            "tasks": [submitted.get_topic_name()],
            "task_dead_letters": [dead_letter_topic],
        },
        end_offsets=end_offsets,
        statuses=statuses,
        publish=producer_for(stats_topic),
        interval_seconds=settings.stats_report_interval_seconds,
    )
    processors = load_processors(
        settings,
        send_verdict=producer_for(verdicts),
        offline_pusher=offline_pusher,
        inbox_archive=inbox_archive,
        stats_report=stats_report,
    )
    lane_topics = {p: topic(settings.topic_name(f"tasks-{name}")) for p, name in LANES.items()}
    retry_topics = [topic(name) for name in retry_topic_names(settings)]
    retry_sends = [producer_for(t) for t in retry_topics]
    lanes = Lanes({p: producer_for(t) for p, t in lane_topics.items()})
    scheduler = Scheduler(settings.task_concurrency)
    runner = TaskRunner(
        registry=processors,
        statuses=statuses,
        scheduler=scheduler,
        retry_topics=retry_sends,
        dead_letters=dead_letters,
        config=RunnerConfig(
            default_timeout=settings.task_timeout_seconds,
            default_max_attempts=settings.task_max_attempts,
            retry_delays=settings.task_retry_delays,
            dead_letter_topic=dead_letter_topic,
            worker=worker_name(),
        ),
        rate_limits=RateLimits(
            statuses.redis, statuses.prefix, ratelimit.parse(settings.task_rate_limits)
        )
        if settings.task_rate_limits
        else None,
    )
    intake = TaskIntake(
        replace(
            options_for(
                settings.topic_name("task-intake"),
                [submitted.get_topic_name(), *settings.task_routes],
                settings.task_batch_max_records,
            ),
            # Records whose lane send or (started here, START_NOW_MAX_SECONDS at most) task
            # is not done yet; the next ones are fetched and submitted meanwhile.
            max_pending_bytes=settings.task_lane_pending_bytes,
            max_pending_records=settings.task_lane_pending_records,
            effect_timeout=START_NOW_MAX_SECONDS + 60,
        ),
        statuses=statuses,
        lanes=lanes,
        registry=processors,
        limits=settings.limits,
        dead_letters=dead_letters,
        dead_letter_topic=dead_letter_topic,
        routes=settings.task_routes,
        runner=runner if settings.task_intake_starts else None,
    )
    lane_stages = [
        TaskLane(
            replace(
                options_for(
                    settings.topic_name(f"tasks-{LANES[p]}"),
                    [t.get_topic_name()],
                    settings.task_batch_max_records,
                ),
                max_pending_bytes=settings.task_lane_pending_bytes,
                max_pending_records=settings.task_lane_pending_records,
                # The runner ends every task by its timeout; a record is given up (and
                # redone) only past the longest timeout a task may ask for.
                effect_timeout=TIMEOUT_MS_LIMIT / 1000 + 60,
            ),
            runner=runner,
            dead_letters=dead_letters,
            priority=p,
        )
        for p, t in lane_topics.items()
    ]
    retry = TaskRetry(
        options_for(
            settings.topic_name("task-retry"),
            [t.get_topic_name() for t in retry_topics],
            settings.task_batch_max_records,
        ),
        lanes=lanes,
        dead_letters=dead_letters,
        stages=[
            (t.get_topic_name(), delay, send)
            for t, delay, send in zip(
                retry_topics, settings.task_retry_delays, retry_sends, strict=True
            )
        ],
    )
    periodic = [Periodic("stats_report", settings.stats_report_interval_seconds)]
    if inbox_archive is not None:
        periodic.append(
            Periodic("inbox_archive", settings.inbox_archive_interval_seconds, names_period=False)
        )
    topics = [
        submitted,
        stats_topic,
        *lane_topics.values(),
        *retry_topics,
        topic(dead_letter_topic),
        *([verdicts] if settings.task_audit_url else []),
    ]
    return TaskSide(
        registry=processors,
        statuses=statuses,
        lanes=lanes,
        scheduler=scheduler,
        runner=runner,
        intake=intake,
        lane_stages=lane_stages,
        retry=retry,
        dead_letter_topic=dead_letter_topic,
        partitions=settings.topic_partitions,
        topics=topics,
        first_retry=retry_sends[0],
        periodic=PeriodicTasks(periodic, lambda tasks: submit(tasks, statuses, lanes, "periodic")),
        stats_topic=stats_topic.get_topic_name(),
    )
