"""The task topics' stages, each an own-group consumer (stage/).

    resonance.task.v1 --[intake]--> <app>-tasks-high | -normal | -low --[lanes]--> processors
                                         ^                                  | failed, attempts left
                                         +--[retry]---- <app>-tasks-retry-k <+
                                                                            | no attempt left,
                                                              resonance.task.v1.dlq <+ or permanent

Intake checks each task (its type must have a processor, its payload must pass the
type's declaration), writes its status and idempotency key, and forwards it to its
priority's lane; a task whose payload is refused is dead at once (status and dead
letter naming the field), and holds no idempotency key, so its corrected resubmission
runs; it never waits for a slot, so a
backlog of one priority never hides the tasks of another behind it. A new task that
would start at once anyway (a slot idle, no task of any priority waiting for one, due,
not rate-limited) is started by the intake itself: the lane's Kafka hop is most of a
task's submit-to-start time and a good part of its cost, and it would order nothing.
Its intake record is then done when the task has ended, as a lane record would be, so
only tasks that end within START_NOW_MAX_SECONDS (their timeout) are started so: the
records after one wait for it to commit. The intake takes records one by one
(per_record), so fetching and starting go on meanwhile; a record redone after a crash
whose task is still "running" is sent to its lane, where the run's lease decides whether
it runs again. Each lane holds its own records in hand (bounded in bytes and number), so
a low-priority backlog cannot stop high-priority records from being fetched; the
scheduler then gives slots by weight.
A retry topic per delay: its records come due in order, so the retry consumer (one for
all of them) pauses a partition until its first record is due (never sleeping in the
loop) and then forwards it to its lane.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition

from resonance_task.pipeline import metrics
from resonance_task.pipeline.dlq import DeadLetters, dlq_topic
from resonance_task.pipeline.limits import Limits
from resonance_task.pipeline.retry import retrying
from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task
from resonance_task.stage import Deferral, GroupConsumer, Records, StageOptions
from resonance_task.tasks import envelope
from resonance_task.tasks.registry import Registry
from resonance_task.tasks.runner import TaskRunner, dead_letter
from resonance_task.tasks.status import Move, TaskStatuses

LANES = envelope.PRIORITY_NAMES  # a lane topic per priority: <app>-tasks-<name>


class Lanes:
    """Where a task goes to wait for a slot: its priority's lane topic."""

    def __init__(self, sends: dict[int, SendRecord]) -> None:
        self._sends = sends

    async def send(self, task: Task) -> Awaitable[object]:
        send = self._sends.get(task.priority, self._sends[Priority.PRIORITY_NORMAL])
        return await send(task.task_id.encode(), task.SerializeToString(), None)


async def submit(
    tasks: Sequence[Task], statuses: TaskStatuses, lanes: Lanes, via: str
) -> list[tuple[str, str]]:
    """Record each (checked) task's status and queue the new ones; what `statuses.submit`
    said of each."""
    outcomes = await statuses.submit(tasks)
    acks = [ack for ack in await queue(tasks, outcomes, lanes, via) if ack is not None]
    if acks:
        await asyncio.gather(*acks)
    return outcomes


async def queue(
    tasks: Sequence[Task],
    outcomes: Sequence[tuple[str, str]],
    lanes: Lanes,
    via: str,
    runner: TaskRunner | None = None,
) -> list[Awaitable[object] | None]:
    """Per task whose status was just written: started at once by `runner` (if given and
    it may), else sent to its lane; what completes when it has ended or its lane has it,
    or None (nothing to do). A task whose status exists but is still queued is queued
    again: its first submit may have died between the two steps, and a second record of
    a queued task runs once (the first run's lease turns the other away)."""
    effects: list[Awaitable[object] | None] = []
    for task, (kind, state) in zip(tasks, outcomes, strict=True):
        metrics.TASKS_SUBMITTED.labels(task.task_type, via).inc()
        started = runner.start_now(task) if runner is not None and kind == "new" else None
        # "running" with a runner: perhaps started at once by a worker that died since;
        # its lane runs it again once the run's lease has ended (and not if it ends).
        laned = kind == "new" or (
            kind == "exists" and (state == "queued" or (state == "running" and runner is not None))
        )
        if started is not None:
            effects.append(started)
        elif laned:
            effects.append(await lanes.send(task))
        else:
            effects.append(None)
    return effects


async def _read_tasks(
    records: Records, dead_letters: DeadLetters, read: Callable[[Any], Callable[[bytes], Task]]
) -> tuple[list[Task], list[int]]:
    """The records' tasks (`read(record)` decodes one) and where each was among them; what
    does not decode is dead-lettered."""
    tasks: list[Task] = []
    at: list[int] = []
    for i, record in enumerate(records):
        task = await dead_letters.decoded(record, read(record))
        if task is not None:
            _stamp_origin(task, record)
            tasks.append(task)
            at.append(i)
    return tasks, at


async def run_again(
    task_id: str,
    allowed: str,
    statuses: TaskStatuses,
    first_retry: SendRecord,
    letter: Task | None = None,
) -> str | None:
    """A task back into the first retry stage, attempts counted from zero, if its state is
    one of `allowed`: None, or why not (its state, or "missing"). `letter` is its dead
    letter's envelope: with it, a task whose status has expired is written anew."""
    task = await statuses.envelope(task_id)
    if task is None and letter is not None:
        task = Task()
        task.CopyFrom(letter)
        task.attempt = 0  # its status is written as submitted
        ((kind, state),) = await statuses.submit([task])
        if kind != "new":
            return state or kind
    elif task is None:
        return "missing"
    else:
        ((kind, state),) = await statuses.move(
            [Move(task_id, "retrying", allowed, {"attempt": 0, "error": "", "finished_at": 0})]
        )
        if kind != "moved":
            return state or kind
    task.attempt = 0
    task.not_before = int(time.time() * 1000)
    await (await first_retry(task_id.encode(), task.SerializeToString(), None))
    return None


def routed_task(task_type: str, record: Any) -> Task:
    """A record of a team's own topic (TASK_TOPIC_ROUTES) as a task: its value the payload,
    its place in the topic the id, so a record read twice is one task, not two."""
    return Task(
        task_id=f"{record.topic}:{record.partition}:{record.offset}",
        task_type=task_type,
        payload=record.value or b"",
        submitted_at=int(record.timestamp or 0),
    )


def _stamp_origin(task: Task, record: Any) -> None:
    """Where the task was first read, for its dead letter: kept from then on."""
    if not task.origin_topic:
        task.origin_topic = record.topic
        task.origin_partition = record.partition
        task.origin_offset = record.offset


class TaskIntake(GroupConsumer):
    """Submitted tasks: status written, then started here at once (`runner`, when a slot
    is idle) or sent to their lane; a record is done when its lane has it or its task has
    ended."""

    per_record = True

    def __init__(
        self,
        options: StageOptions,
        *,
        statuses: TaskStatuses,
        lanes: Lanes,
        registry: Registry,
        limits: Limits,
        dead_letters: DeadLetters,
        routes: Mapping[str, str] | None = None,
        runner: TaskRunner | None = None,
        dead_letter_topic: str | None = None,
    ) -> None:
        """`options.topics`: the task topic, then the topics `routes` maps to task types."""
        topic = options.topics[0]
        self._statuses = statuses
        self._lanes = lanes
        self._runner = runner
        self._registry = registry
        self._limits = limits
        self._dead_letters = dead_letters
        # Where a task refused for its payload goes: the task DLQ, whichever topic it came
        # from, since it has a status that a replay from there finds.
        self._dead_letter_topic = dead_letter_topic or dlq_topic(topic)
        self._routes = dict(routes or {})
        assert set(options.topics) == {topic, *self._routes}, options.topics
        super().__init__(options, stage="task_intake", dead_letters=dead_letters)

    def _task_of(self, record: Any, known: frozenset[str], value: bytes) -> Task:
        """The record's task, checked; TaskError (dead-lettered with its reason) if none."""
        routed = self._routes.get(record.topic)
        if routed is not None:
            task = routed_task(routed, record)
        else:
            task = envelope.decode(value)
            # Keyed by task_id, as the contract says.
            task.task_id = task.task_id or (record.key or b"").decode(errors="replace")
        return envelope.check(task, known, self._limits)

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        known = self._registry.types()
        effects: list[Awaitable[object] | None] = [None] * len(records)
        read, read_at = await _read_tasks(
            records, self._dead_letters, lambda r: functools.partial(self._task_of, r, known)
        )
        tasks: list[Task] = []
        at: list[int] = []
        refused: list[tuple[int, Task, envelope.TaskError]] = []
        for i, task in zip(read_at, read, strict=True):
            try:
                tasks.append(envelope.check_payload(task, self._registry, self._limits))
                at.append(i)
            except envelope.TaskError as exc:
                refused.append((i, task, exc))
        if not tasks and not refused:
            return effects
        # A refused task's status is written without its idempotency key: the key stays
        # free for the task sent again with its payload mended.
        unkeyed = []
        for _, task, _ in refused:
            blank = Task()
            blank.CopyFrom(task)
            blank.idempotency_key = ""
            unkeyed.append(blank)
        submitted = [*tasks, *unkeyed]
        # Kafka is the buffer while Redis is away; a batch Redis refuses for good is
        # narrowed down to its record by the stage's isolation, and dead-lettered.
        outcomes = await retrying(lambda: self._statuses.submit(submitted), "task statuses")
        queued = await queue(tasks, outcomes[: len(tasks)], self._lanes, "topic", self._runner)
        for i, effect in zip(at, queued, strict=True):
            effects[i] = effect
        for (i, task, why), (kind, state) in zip(refused, outcomes[len(tasks) :], strict=True):
            if kind == "new" or (kind == "exists" and state == "queued" and await self._mine(task)):
                effects[i] = await self._refuse(task, why)
        return effects

    async def _mine(self, task: Task) -> bool:
        """Whether the queued status under a refused task's id is its own: its record
        read again after its worker died before the task was dead. Another task's (its
        id used twice, the other one valid) is left to run."""
        stored = await retrying(lambda: self._statuses.envelope(task.task_id), "task statuses")
        return stored is not None and stored.payload == task.payload

    async def _refuse(self, task: Task, exc: envelope.TaskError) -> Awaitable[object]:
        """The task dead for its payload, never run: its letter, then its status."""
        error = str(exc)
        ack = await dead_letter(
            self._dead_letters,
            self._dead_letter_topic,
            task,
            exc.reason,
            error,
            type(exc).__name__,
            attempts=0,
        )

        async def then() -> None:
            # The letter first: a worker dying between the two leaves the task queued,
            # and the record, read again, writes both again.
            if ack is not None:
                await ack
            fields = {"error": error, "finished_at": int(time.time() * 1000)}
            move = Move(task.task_id, "dead", "queued", fields)
            await retrying(lambda: self._statuses.move([move]), "task statuses")

        return asyncio.ensure_future(then())


class TaskLane(GroupConsumer):
    """One priority's tasks, each to the runner; a record is done when its task has ended."""

    per_record = True

    def __init__(
        self,
        options: StageOptions,
        *,
        runner: TaskRunner,
        dead_letters: DeadLetters,
        priority: int,
    ) -> None:
        self._runner = runner
        self._dead_letters = dead_letters
        self._priority = priority
        super().__init__(options, stage=f"task_{LANES[priority]}", dead_letters=dead_letters)

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        effects: list[Awaitable[object] | None] = [None] * len(records)
        # Stamped with where it was read when submitted through the API (straight here).
        tasks, at = await _read_tasks(records, self._dead_letters, lambda _: Task.FromString)
        for i, effect in zip(at, await self._runner.start(tasks), strict=True):
            effects[i] = effect
        return effects

    async def on_start(self) -> None:
        self._runner.watch_cancels()
        await super().on_start()

    async def on_stop(self) -> None:
        await super().on_stop()
        self._runner.stop_watching()

    async def drain(self, deadline: float) -> None:
        await self._runner.stop(deadline, self._priority)
        await super().drain(deadline)


class TaskRetry(GroupConsumer):
    """The retry topics, one consumer for all: each record back to its lane once due.

    `stages` is (topic, delay, send again to it) per retry topic: a record's delay is its
    topic's. One consumer, not one per topic: each costs the broker a member, heartbeats
    and fetches at rest, and pausing works per partition all the same."""

    def __init__(
        self,
        options: StageOptions,
        *,
        lanes: Lanes,
        dead_letters: DeadLetters,
        stages: Sequence[tuple[str, float, SendRecord]],
    ) -> None:
        """`stages`: (topic, delay, send) for each of `options.topics`."""
        self._lanes = lanes
        self._dead_letters = dead_letters
        self._stages = {topic: (delay, send) for topic, delay, send in stages}
        self._later = Deferral()
        assert set(options.topics) == set(self._stages), options.topics
        super().__init__(
            options, stage="task_retry", dead_letters=dead_letters, deferral=self._later
        )

    async def handle(self, records: Records) -> Awaitable[object] | None:
        now = time.time() * 1000
        acks = []
        waiting: set[TopicPartition] = set()
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if tp in waiting:
                continue  # behind a record not yet due: fetched again with it
            task = await self._dead_letters.decoded(record, Task.FromString)
            if task is None:
                continue
            delay, send_again = self._stages[record.topic]
            if task.not_before > now + 2_000 * delay:
                # Due much later than this topic's delay (a task scheduled for later):
                # pausing for it would hold up the records behind it. Back of the line.
                acks.append(await send_again(record.key, record.value or b"", None))
                continue
            if task.not_before > now:
                waiting.add(tp)
                self._later.defer(tp, record.offset, (task.not_before - now) / 1000)
                continue
            acks.append(await self._lanes.send(task))
        return asyncio.gather(*acks) if acks else None
