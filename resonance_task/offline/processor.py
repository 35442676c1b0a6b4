"""The offline push stage: offline-pushes records -> notifications at push providers.

It reads the offline-pushes topic in a consumer group of its own (`<APP_ID>-offline`):
providers are rate-limited and may be slow for minutes, and that must hold back nothing
but offline push. For a fetched batch it reads the users' device tokens in one round
trip, sends each provider its notifications (providers concurrently, each in chunks of
its batch size, each under its own rate limit), retries what the provider says to retry
with jittered exponential backoff, removes tokens the provider calls invalid, and puts
what finally failed on `<topic>.dlq` with the reason (per source record, only its pushes
that failed, so a replay notifies no one twice).
Offsets are committed after that, so a crash resends the batch: a device may then get a
notification twice, which is what offline push has always promised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span

from resonance_task.errors import Backoff
from resonance_task.offline import metrics
from resonance_task.offline import records as offline_records
from resonance_task.offline.provider import Notification, Outcome, Provider
from resonance_task.offline.tokens import DeviceTokenStore
from resonance_task.pipeline.dlq import DeadLetters, SourceRecord
from resonance_task.pipeline.retry import retrying
from resonance_task.pipeline.trace import start_span
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush
from resonance_task.stage import GroupConsumer, Records, StageOptions, source_record

if TYPE_CHECKING:
    from resonance_task.offline.setup import ProviderSet

log = logging.getLogger(__name__)

BODY_MAX = 180  # characters of the message in the notification; the app syncs the rest


def notification_text(push: OfflinePush) -> tuple[str, str]:
    message = push.message
    title = message.session_meta.name or message.from_username or "New message"
    if message.session_meta.type == 2 and message.from_username:
        title = f"{message.from_username} in {title}"
    body = message.content if message.type in ("", "text") else f"[{message.type}]"
    return title, body if len(body) <= BODY_MAX else body[: BODY_MAX - 1] + "…"


class OfflinePusher:
    def __init__(
        self,
        *,
        tokens: DeviceTokenStore,
        providers: Mapping[str, Provider],
        dead_letters: DeadLetters,
        max_attempts: int = 5,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self._tokens = tokens
        self._providers = providers
        self._dead_letters = dead_letters
        self._max_attempts = max_attempts
        self._backoff = Backoff(first=backoff_min, cap=backoff_max)

    @property
    def provider_names(self) -> list[str]:
        return sorted(self._providers)

    async def handle(self, records: Sequence[SourceRecord]) -> None:
        pushes: list[tuple[SourceRecord, OfflinePush]] = []
        for record in records:
            decoded = await self._dead_letters.decoded(record, offline_records.decode)
            pushes += [(record, push) for push in decoded or ()]
        if not pushes:
            return
        try:
            errors = await self.notify([push for _, push in pushes])
        except Exception as exc:  # the token store, not transient (those wait)
            for record in dict.fromkeys(record for record, _ in pushes):
                await self._dead_letters.put(record, "token_store_error", repr(exc))
            return
        # Per source record, a dead letter holding only its pushes that failed: a replay
        # then notifies no one twice.
        failed_pushes: dict[SourceRecord, list[OfflinePush]] = defaultdict(list)
        reasons_of: dict[SourceRecord, list[str]] = defaultdict(list)
        for index, reasons in sorted(errors.items()):
            record, push = pushes[index]
            failed_pushes[record].append(push)
            reasons_of[record] += reasons
        for record, failed_here in failed_pushes.items():
            reasons = reasons_of[record]
            detail = f"{len(reasons)} notification(s) failed: " + "; ".join(reasons[:5])
            (value,) = offline_records.encode(failed_here, max_bytes=2**31)
            await self._dead_letters.put(replace(record, value=value), "provider_failed", detail)

    async def notify(self, pushes: Sequence[OfflinePush]) -> dict[int, list[str]]:
        """Notify every device of every push's users (retrying what a provider asks to);
        what finally failed, by the push's index. The token store's non-transient error
        is raised (transient ones are waited out)."""
        spans = [start_span("offline_push", p.trace_headers, p.message.msg_id) for p in pushes]
        for span, push in zip(spans, pushes, strict=True):
            if span is not None:
                span.set_attribute("resonance.reason", push.reason)
        try:
            return await self._notify(pushes, spans)
        finally:
            for span in spans:
                if span is not None:
                    span.end()

    async def _notify(
        self, pushes: Sequence[OfflinePush], spans: Sequence[Span | None]
    ) -> dict[int, list[str]]:
        users = sorted({u for push in pushes for u in push.users})
        try:
            devices = await retrying(lambda: self._tokens.tokens(users), "device token store")
        except Exception as exc:
            log.error("device token store failed for %d users: %r", len(users), exc)
            raise
        by_provider: dict[str, list[Notification]] = defaultdict(list)
        for index, push in enumerate(pushes):
            title, body = notification_text(push)
            data = {
                "msg_id": str(push.message.msg_id),
                "session_id": push.message.session_id,
                "seq_id": str(push.message.seq_id),
            }
            for user in push.users:
                found = devices.get(user, [])
                if not found:
                    metrics.SKIPPED.labels("no_device").inc()
                for device in found:
                    if device.provider not in self._providers:
                        metrics.SKIPPED.labels("no_provider").inc()
                        continue
                    by_provider[device.provider].append(
                        Notification(user, device, title, body, data, push.priority > 0, index)
                    )
        failures = await asyncio.gather(
            *(self._deliver(self._providers[name], notes) for name, notes in by_provider.items())
        )
        errors: dict[int, list[str]] = defaultdict(list)
        for failed in failures:
            for note, outcome in failed:
                errors[note.record].append(f"{note.device.provider}:{outcome.detail}")
        for index, span in enumerate(spans):
            if span is not None:
                span.set_attribute("resonance.failed_notifications", len(errors.get(index, ())))
        return errors

    async def _deliver(
        self, provider: Provider, notes: list[Notification]
    ) -> list[tuple[Notification, Outcome]]:
        """Send, retry, forget invalid tokens; returns what finally failed."""
        failed: list[tuple[Notification, Outcome]] = []
        pending = notes
        for attempt in range(1, self._max_attempts + 1):
            outcomes: list[Outcome] = []
            for start in range(0, len(pending), provider.max_batch):
                outcomes += await _send(provider, pending[start : start + provider.max_batch])
            retry: list[Notification] = []
            wait = 0.0
            for note, outcome in zip(pending, outcomes, strict=True):
                metrics.NOTIFICATIONS.labels(provider.name, outcome.result).inc()
                if outcome.result == "invalid_token":
                    try:
                        await retrying(
                            partial(self._tokens.remove, note.user, note.device),
                            "device token store",
                        )
                    except Exception as exc:  # the token stays; the next push finds it again
                        log.error("could not remove an invalid token of %r: %r", note.user, exc)
                elif outcome.result == "failed":
                    failed.append((note, outcome))
                elif outcome.result == "retry":
                    if attempt == self._max_attempts:
                        failed.append((note, outcome))
                    else:
                        retry.append(note)
                        wait = max(wait, outcome.retry_after or 0.0)
            if not retry:
                break
            # Retry-After is honoured up to backoff_max: a provider asking for an hour
            # would otherwise hold the batch (and its partitions) past the consumer's
            # max.poll.interval. Retrying early costs a 429; the last one dead-letters.
            delay = max(min(wait, self._backoff.cap), self._backoff.delay(attempt))
            log.info("%s: %d notifications to retry in %.2fs", provider.name, len(retry), delay)
            await asyncio.sleep(delay)
            pending = retry
        return failed


async def _send(provider: Provider, chunk: list[Notification]) -> list[Outcome]:
    # A provider that raises (a token endpoint answering HTML, a key that will not sign)
    # fails its own notifications, to be retried then dead-lettered; it does not stop the
    # stage or take the other providers' outcomes with it.
    started = time.monotonic()
    try:
        outcomes = await provider.send(chunk)
    except Exception as exc:
        metrics.PROVIDER_DURATION.labels(provider.name, "raised").observe(
            time.monotonic() - started
        )
        log.exception("%s: send raised", provider.name)
        return [Outcome("retry", f"{type(exc).__name__}: {exc}"[:300])] * len(chunk)
    metrics.PROVIDER_DURATION.labels(provider.name, "ok").observe(time.monotonic() - started)
    if len(outcomes) != len(chunk):
        detail = f"{len(outcomes)} outcomes for {len(chunk)} notifications"
        return [Outcome("failed", detail)] * len(chunk)
    return outcomes


class OfflinePushConsumer(GroupConsumer):
    def __init__(
        self,
        options: StageOptions,
        *,
        pusher: OfflinePusher,
        providers: ProviderSet,
        dead_letters: DeadLetters,
    ) -> None:
        self._pusher = pusher
        self._providers = providers  # the pusher's, built here at start and closed at stop
        super().__init__(options, stage="offline", dead_letters=dead_letters)

    async def on_start(self) -> None:
        self._providers.open()
        await super().on_start()

    @property
    def pusher(self) -> OfflinePusher:
        return self._pusher

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "providers": self._pusher.provider_names}

    async def on_stop(self) -> None:
        try:
            await super().on_stop()
        finally:
            await self._providers.aclose()

    async def handle(self, records: Records) -> None:
        await self._pusher.handle([source_record(r) for r in records])
