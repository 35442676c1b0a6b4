"""The task API's requests and answers as pydantic models: what the views validate bodies
and queries with (a 4xx naming the field), and what the OpenAPI document's schemas are
generated from (web/openapi.py), so the two cannot drift apart.

A task itself is the proto3 JSON form of resonance.task.v1.Task: tasks/envelope.py reads
and checks it (with the limits named here), and each task type's payload is its
processor's own declaration (tasks/payload.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from resonance_task.tasks.envelope import MAX_ATTEMPTS_LIMIT, PRIORITIES, TIMEOUT_MS_LIMIT
from resonance_task.tasks.status import STATES

BATCH_MAX = 1000
LIST_LIMIT_MAX = 1000
HOURLY_LIMIT_MAX = 1000

State = Literal["queued", "running", "retrying", "succeeded", "failed", "dead", "cancelled"]
assert get_args(State) == STATES, "State must list tasks/status.py's STATES"

_MS = "ms since epoch"
PriorityName = Literal["high", "normal", "low"]
assert set(get_args(PriorityName)) == set(PRIORITIES), "PriorityName must list PRIORITIES"
PriorityNumber = Literal[0, 1, 2]
assert set(get_args(PriorityNumber)) == set(PRIORITIES.values()), "as the proto numbers them"
# proto3 JSON writes an int64 as a string; either is read.
Int64 = int | Annotated[str, StringConstraints(pattern=r"^-?[0-9]+$")]
_BASE64: dict[str, Any] = {"contentEncoding": "base64"}


class _Answer(BaseModel):
    """An answer: what the views write may carry more than is listed (a status grows)."""

    model_config = ConfigDict(extra="allow")


class Error(BaseModel):
    error: str
    field: str | None = Field(None, description="the request field at fault")


class TaskFields(BaseModel):
    """The proto3 JSON form of resonance.task.v1.Task, plus `payload` as any JSON value and
    `priority` by name."""

    model_config = ConfigDict(title="TaskFields")

    task_id: str | None = Field(None, description="made up (uuid4 hex) when missing")
    task_type: str = Field(description="a registered processor's name")
    payload: Any = Field(
        None,
        description="any JSON value, handed to the processor as its JSON text; for a task "
        "type that declares its payload, what its TaskSubmit.<type> says",
    )
    payload_b64: str | None = Field(None, json_schema_extra=_BASE64)
    priority: PriorityName | PriorityNumber | None = None
    max_attempts: int | None = Field(None, ge=0, le=MAX_ATTEMPTS_LIMIT)
    not_before: Int64 | None = Field(None, description=_MS)
    timeout_ms: int | None = Field(None, ge=0, le=TIMEOUT_MS_LIMIT)
    idempotency_key: str | None = Field(None, max_length=256)
    trace_headers: dict[str, str] | None = None


class SubmitOutcome(_Answer):
    task_id: str
    state: State
    duplicate_of: str | None = Field(
        None, description="the task that holds this idempotency key: this one never runs"
    )
    existed: bool | None = Field(None, description="this task id was submitted before")


class CancelRequested(_Answer):
    task_id: str
    state: Literal["running"]
    cancel_requested: Literal[True]


class TaskStatus(_Answer):
    task_id: str
    state: State
    progress: float = Field(ge=0, le=100)
    task_type: str | None = None
    priority: PriorityName | None = None
    progress_note: str | None = None
    result: Any = Field(None, description="what the processor returned (JSON)")
    payload: Any = Field(None, description="the payload as accepted, its type's defaults filled in")
    payload_b64: str | None = Field(
        None,
        description="the payload, when it is not JSON",
        json_schema_extra=_BASE64,
    )
    error: str | None = None
    idempotency_key: str | None = None
    worker: str | None = None
    cancel_requested: bool | None = None
    attempt: int | None = Field(None, ge=0)
    max_attempts: int | None = Field(None, ge=0)
    created_at: int | None = Field(None, ge=0, description=_MS)
    updated_at: int | None = Field(None, ge=0, description=_MS)
    started_at: int | None = Field(None, ge=0, description=_MS)
    finished_at: int | None = Field(None, ge=0, description=_MS)


class TaskList(_Answer):
    tasks: list[TaskStatus]
    count: int = Field(ge=0)


class TaskQuery(BaseModel):
    """GET /api/v1/tasks's query."""

    status: State | None = None
    task_type: str | None = None
    limit: int = Field(100, ge=1, le=LIST_LIMIT_MAX)


class BatchRequest(BaseModel):
    # Not TaskSubmit items: a bad task is answered in its own result, the batch is not
    # refused for it. The count is checked apart (413, not 400).
    tasks: list[Any] = Field(min_length=1, description="each a TaskSubmit, checked on its own")


class BatchResult(_Answer):
    index: int = Field(ge=0)
    task_id: str | None = None
    state: State | None = None
    duplicate_of: str | None = None
    existed: bool | None = None
    error: str | None = None
    field: str | None = None


class BatchAnswer(_Answer):
    results: list[BatchResult]


class ReplayRequest(BaseModel):
    task_ids: list[str] | None = Field(None, description="which dead tasks; all when missing")


class ReplayAnswer(_Answer):
    replayed: list[str]
    count: int = Field(ge=0)


class Worker(_Answer):
    worker: str
    web_url: str | None = None
    seen_at: int
    started_at: int | None = None
    stages: dict[str, dict[str, Any]]
    tasks: dict[str, Any] | None = None


class WorkerList(_Answer):
    workers: list[Worker]


class Queue(_Answer):
    topic: str
    group: str | None = None
    depth: int = Field(ge=0, description="records held")
    lag: int | None = Field(None, ge=0, description="records its group has still to read")
    partitions: int | None = Field(None, ge=0)


class QueueList(_Answer):
    queues: list[Queue]


class Report(_Answer):
    period: str = Field(description="the period's start, ISO 8601 UTC")
    period_start: int = Field(description="ms since the epoch")
    period_end: int
    from_: int | None = Field(
        alias="from", description="the span counted: from the report before (null: the first)"
    )
    to: int
    records: dict[str, int] = Field(description="records added to each topic")
    tasks: dict[str, int] = Field(description="tasks that reached each final state")


class ReportList(_Answer):
    reports: list[Report]


class HourlyQuery(BaseModel):
    limit: int = Field(24, ge=1, le=HOURLY_LIMIT_MAX)


COMPONENTS: tuple[type[BaseModel], ...] = (
    Error,
    TaskFields,
    SubmitOutcome,
    CancelRequested,
    TaskStatus,
    TaskList,
    BatchRequest,
    BatchAnswer,
    ReplayRequest,
    ReplayAnswer,
    WorkerList,
    QueueList,
    ReportList,
)


def error_of(exc: ValidationError) -> Error:
    """The first thing wrong, as the API says it: `field` is its dotted path."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "body"
    return Error(error=f"{field}: {first['msg']}", field=field)
