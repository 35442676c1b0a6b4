"""What a stage is told: how it reads, how much it holds, how it commits (typed), and the
policies only some stages use, passed in by the stage that needs them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from resonance_task.pipeline.dlq import DeadLetters
from resonance_task.pipeline.offset_marks import OffsetMarks
from resonance_task.stage.offsets import Records

COMMIT_INTERVAL = 0.1  # seconds


@dataclass(frozen=True, kw_only=True)
class StageOptions:
    """One stage's consumer group and its limits."""

    topics: tuple[str, ...]
    consumer_config: Mapping[str, Any]  # aiokafka's AIOKafkaConsumer arguments, group_id too
    batch_max_records: int
    # How much is in hand at once, its effects not yet done: batches (a batch stage), or
    # bytes and records (a per-record stage). Past that, Kafka is the buffer.
    max_pending_batches: int = 1
    max_pending_bytes: int = 64 * 1024 * 1024
    max_pending_records: int | None = None
    drain_seconds: float = 5.0  # at a revocation or a stop, for what is in flight
    effect_timeout: float = 120.0  # an effect not done by then fails the stage (a restart)
    idle_fetch_wait_ms: int | None = None  # a fetch's wait while the topic is idle
    commit_interval: float = COMMIT_INTERVAL
    # Where the done prefix is kept between commits (pipeline/offset_marks.py).
    marks: OffsetMarks | None = None
    # Where handling sends what it cannot use: commits and marks wait for those letters,
    # or a successor starting past them would never send them.
    letters: DeadLetters | None = None

    @property
    def group(self) -> str:
        return str(self.consumer_config.get("group_id"))


@dataclass(frozen=True)
class Replay:
    """A stage that must tell a repeat of done work from new work (push: the same push
    fanned out again by a successor of a killed fanout) is shown, when it takes a
    partition, the last `records` records before where it resumes it, and those its mark
    names done past that point as they are fetched: done already, not to redo."""

    records: int
    replayed: Callable[[TopicPartition, Records], None]


# Waited for before the first fetch (the group is joined meanwhile): what the stage
# decides with must be in place first (fanout: routes views that cover presence).
Gate = Callable[[], Awaitable[object]]

# (group, topics, batch_max_records) -> a stage's options with what every stage shares
# (app.py's stage_options): how the task side and plugins ask for theirs.
OptionsFor = Callable[[str, Sequence[str], int], StageOptions]
