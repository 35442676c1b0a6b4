"""The processors every worker has.

`noop` does nothing and succeeds: a probe of the task path end to end (submit, status,
a slot, the result), and what bench/ measures the path's own cost with.

`content_audit` (when TASK_AUDIT_URL is set) asks a moderation service about a piece of
content and publishes its verdict to TOPIC_AUDIT_VERDICTS, keyed by the content's id:

    payload   {"content_id": "m-1", "content": "text", ...anything else, passed along}
    request   POST TASK_AUDIT_URL, JSON {"task_id": ..., **payload}
    answer    200 JSON {"verdict": "pass" | "block" | "review" | ..., ...}
    verdict   {"task_id", "content_id", "verdict", "checked_at", "detail": answer}

A payload without content, or a 4xx from the service (it refuses the request as it is),
fails for good; a 5xx, 408, 429, a timeout or a refused connection is retried with the
task's backoff.

`offline_push` (when an offline provider is configured) is the offline push stage's work
as a task: its payload is an `OfflinePush` in proto3 JSON, or the protobuf bytes of an
`OfflinePushBatch` as on the offline-pushes topic; every device of
its users is notified through the same providers, retries and token clean-up. What still
fails after the providers' retries ends the task dead, naming the failures (a replay
notifies again those that had succeeded).

`inbox_archive` (when INBOX_ARCHIVE_* is set) moves the oldest entries of Redis inboxes
to PostgreSQL (stores/archive.py); `stats_report` publishes a period's counts
(tasks/reports.py). The leader submits both once a period (tasks/periodic.py).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx
from google.protobuf.json_format import Parse, ParseError
from google.protobuf.message import DecodeError

from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush, OfflinePushBatch
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
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


class ContentAudit:
    def __init__(self, url: str, send_verdict: SendRecord, timeout: float) -> None:
        self._url = url
        self._send = send_verdict
        self._client = httpx.AsyncClient(timeout=timeout)

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        payload = _json_object(task)
        content_id, content = payload.get("content_id"), payload.get("content")
        if not isinstance(content_id, str) or not content_id:
            raise PermanentError("payload.content_id: a non-empty string")
        if not isinstance(content, str):
            raise PermanentError("payload.content: a string")
        response = await self._client.post(self._url, json={"task_id": task.task_id, **payload})
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


class OfflinePushTask:
    def __init__(self, pusher: Any) -> None:
        self._pusher = pusher  # offline.processor.OfflinePusher (imported only if configured)

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        pushes = _offline_pushes(task.payload)
        if not pushes or not any(push.users for push in pushes):
            raise PermanentError("payload: an OfflinePush with users")
        errors = await self._pusher.notify(pushes)
        if errors:
            reasons = [reason for found in errors.values() for reason in found]
            raise PermanentError(
                f"{len(reasons)} notification(s) failed: " + "; ".join(reasons[:5])
            )
        return {"pushes": len(pushes), "users": sum(len(push.users) for push in pushes)}


class InboxArchiveTask:
    """One archive pass (stores/archive.py); payload {"users": [...]} limits it to those
    inboxes, anything else (the leader's periodic payload) means every inbox."""

    def __init__(self, archive: InboxArchive) -> None:
        self._archive = archive

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        users = _json_object(task).get("users")
        if users is not None and not (
            isinstance(users, list) and all(isinstance(u, str) and u for u in users)
        ):
            raise PermanentError("payload.users: a list of user ids")
        run = await self._archive.run(users, progress=ctx.progress, cancelled=lambda: ctx.cancelled)
        return run.as_dict()


def _offline_pushes(payload: bytes) -> list[OfflinePush]:
    if payload.lstrip().startswith(b"{"):
        push = OfflinePush()
        try:
            Parse(payload, push)
        except ParseError as exc:
            raise PermanentError(f"payload: not an OfflinePush: {exc}") from None
        return [push]
    try:
        return list(OfflinePushBatch.FromString(payload).pushes)
    except DecodeError as exc:
        raise PermanentError(f"payload: not an OfflinePushBatch: {exc}") from None


def _json_object(task: Task) -> dict[str, Any]:
    try:
        value = json.loads(task.payload or b"{}")
    except ValueError as exc:
        raise PermanentError(f"payload: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PermanentError("payload: a JSON object")
    return value


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
