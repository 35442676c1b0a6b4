"""The processors every worker has.

`noop` does nothing and succeeds: a probe of the task path end to end (submit, status,
a slot, the result), and what bench/ measures the path's own cost with.

`content_audit` (when TASK_AUDIT_URL is set) asks a moderation service about a piece of
content and publishes its verdict to TOPIC_AUDIT_VERDICTS, keyed by the content's id:

    payload   {"content_id": "m-1", "content": "text", ...anything else, passed along}
    request   POST TASK_AUDIT_URL, JSON {"task_id": ..., **payload}
    answer    200 JSON {"verdict": "pass" | "block" | "review" | ..., ...}
    verdict   {"task_id", "content_id", "verdict", "checked_at", "detail": answer}

A payload without content_id or content is refused at submit; a 4xx from the service (it
refuses the request as it is) fails for good; a 5xx, 408, 429, a timeout or a refused
connection is retried with the task's backoff.

`offline_push` (when an offline provider is configured) is the offline push stage's work
as a task: its payload is an `OfflinePush` in proto3 JSON, or the protobuf bytes of an
`OfflinePushBatch` as on the offline-pushes topic; every device of
its users is notified through the same providers, retries and token clean-up. What still
fails after the providers' retries ends the task dead, naming the failures (a replay
notifies again those that had succeeded).

`inbox_archive` (when INBOX_ARCHIVE_* is set) moves the oldest entries of Redis inboxes
to PostgreSQL (stores/archive.py); `stats_report` publishes a period's counts
(tasks/reports.py). The leader submits both once a period (tasks/periodic.py).

Each declares its payload (tasks/payload.py): a task whose payload cannot work is refused
at submit, naming the field, and a processor here gets its payload checked.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from google.protobuf.json_format import Parse, ParseError
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field

from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush, OfflinePushBatch
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks.payload import (
    PayloadInvalid,
    PayloadType,
    payload_of,
    proto_json_field,
    proto_json_schema,
)
from resonance_task.tasks.registry import Context, PermanentError, Registry

if TYPE_CHECKING:
    from resonance_task.stores.archive import InboxArchive  # imported only where an archive is set

# A pass over every inbox of a big Redis takes a while; past this it is retried, and the
# retry only redoes what the cut-off pass had not moved yet.
ARCHIVE_TIMEOUT = 3600.0
# What a moderation service answers when it is the one that should be asked again.
_RETRYABLE = frozenset({408, 425, 429})


async def noop(task: Task, ctx: Context) -> dict[str, Any]:
    return {"ok": True}


class AuditPayload(BaseModel):
    """content_audit's payload; anything else in it reaches the moderation service too."""

    model_config = ConfigDict(extra="allow", strict=True, title="ContentAuditPayload")

    content_id: str = Field(min_length=1, description="the content's id: the verdict's key")
    content: str = Field(description="what the moderation service judges")


class ContentAudit:
    payload = AuditPayload

    def __init__(self, url: str, send_verdict: SendRecord, timeout: float) -> None:
        self._url = url
        self._send = send_verdict
        self._client = httpx.AsyncClient(timeout=timeout)

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        payload = payload_of(task, ctx, AuditPayload)
        content_id = payload.content_id
        body = {"task_id": task.task_id, **payload.model_dump()}
        response = await self._client.post(self._url, json=body)
        if response.status_code >= 500 or response.status_code in _RETRYABLE:
            response.raise_for_status()  # the task's retries ask again later
        if response.status_code != 200:
            raise PermanentError(
                f"the moderation service refused it: {response.status_code} {response.text[:200]}"
            )
        try:
            answer = response.json()
        except ValueError:
            raise PermanentError(
                f"the moderation service answered non-JSON: {response.text[:200]}"
            ) from None
        verdict = answer.get("verdict") if isinstance(answer, dict) else None
        if not isinstance(verdict, str) or not verdict:
            raise PermanentError(f"the moderation service gave no verdict: {str(answer)[:200]}")
        record = {
            "task_id": task.task_id,
            "content_id": content_id,
            "verdict": verdict,
            "checked_at": int(time.time() * 1000),
            "detail": answer,
        }
        value = json.dumps(record, separators=(",", ":")).encode()
        await (await self._send(content_id.encode(), value, None))
        return {"content_id": content_id, "verdict": verdict}


class OfflinePushPayload(PayloadType):
    """An OfflinePush in proto3 JSON, or an OfflinePushBatch's protobuf bytes (as the
    offline-pushes topic has them, given as payload_b64); kept as given. The processor
    gets the pushes."""

    def load(self, raw: bytes) -> list[OfflinePush]:
        if not raw.strip():
            raise PayloadInvalid(["users"], "required")  # as the JSON form's schema says
        if raw.lstrip().startswith(b"{"):
            push = OfflinePush()
            try:
                Parse(raw, push)
            except ParseError as exc:
                field = proto_json_field(str(exc))
                raise PayloadInvalid([field] if field else [], str(exc)) from None
            if not push.users:
                raise PayloadInvalid(["users"], "at least one user")
            return [push]
        try:
            pushes = list(OfflinePushBatch.FromString(raw).pushes)
        except DecodeError as exc:
            why = f"neither an OfflinePush (JSON) nor an OfflinePushBatch: {exc}"
            raise PayloadInvalid([], why) from None
        if not any(push.users for push in pushes):
            raise PayloadInvalid(["pushes"], "an OfflinePushBatch with users")
        return pushes

    def json_schema(self) -> dict[str, Any]:
        schema = proto_json_schema(OfflinePush.DESCRIPTOR)
        schema["properties"]["users"]["minItems"] = 1
        return {
            **schema,
            "title": "OfflinePushPayload",
            "description": "An OfflinePush in proto3 JSON (lowerCamelCase names too), with "
            "users; or, as payload_b64, an OfflinePushBatch's protobuf bytes",
            "required": ["users"],
        }


class OfflinePushTask:
    payload = OfflinePushPayload()

    def __init__(self, pusher: Any) -> None:
        self._pusher = pusher  # offline.processor.OfflinePusher (imported only if configured)

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        pushes = ctx.payload if isinstance(ctx.payload, list) else self.payload.load(task.payload)
        errors = await self._pusher.notify(pushes)
        if errors:
            reasons = [reason for found in errors.values() for reason in found]
            raise PermanentError(
                f"{len(reasons)} notification(s) failed: " + "; ".join(reasons[:5])
            )
        return {"pushes": len(pushes), "users": sum(len(push.users) for push in pushes)}


class ArchivePayload(BaseModel):
    """inbox_archive's payload."""

    # Nothing else allowed: a misspelt `users` would otherwise mean every inbox.
    model_config = ConfigDict(extra="forbid", strict=True, title="InboxArchivePayload")

    users: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="only these users' inboxes; every inbox when missing or null"
    )


class InboxArchiveTask:
    """One archive pass (stores/archive.py), over every inbox or the payload's users'."""

    payload = ArchivePayload

    def __init__(self, archive: InboxArchive) -> None:
        self._archive = archive

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        users = payload_of(task, ctx, ArchivePayload).users
        run = await self._archive.run(users, progress=ctx.progress, cancelled=lambda: ctx.cancelled)
        return run.as_dict()


def register(
    registry: Registry,
    *,
    audit_url: str | None = None,
    send_verdict: SendRecord | None = None,
    audit_timeout: float = 5.0,
    offline_pusher: Any = None,
    inbox_archive: Any = None,
    stats_report: Any = None,
) -> None:
    registry.add("noop", noop, timeout=5.0)
    if inbox_archive is not None:
        registry.add("inbox_archive", InboxArchiveTask(inbox_archive), timeout=ARCHIVE_TIMEOUT)
    if stats_report is not None:
        registry.add("stats_report", stats_report, timeout=60.0)
    if offline_pusher is not None:
        registry.add("offline_push", OfflinePushTask(offline_pusher))
    if audit_url and send_verdict is not None:
        # The task's own timeout covers retries of the HTTP call: a little above one call.
        processor = ContentAudit(audit_url, send_verdict, audit_timeout)
        registry.add("content_audit", processor, timeout=audit_timeout + 5)
