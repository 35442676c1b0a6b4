"""The dead-letter path: a record we cannot use goes to `<topic>.dlq`, as read, with why.

Bad input never stops a worker: the agent that found it hands it here and moves on,
so the offset advances and an operator can list and replay it later.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf.message import DecodeError

from resonance_task.errors import PoisonError
from resonance_task.pipeline import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

DLQ_SUFFIX = ".dlq"
H_REASON = "dlq.reason"
H_ERROR = "dlq.error"
H_TOPIC = "dlq.topic"
H_PARTITION = "dlq.partition"
H_OFFSET = "dlq.offset"
H_AT = "dlq.at"

# (topic, key, value, headers) -> awaitable. Faust's app.send and a bare aiokafka
# producer both fit, so agents and the storage consumer share one dead-letter path.
SendRaw = Callable[[str, bytes | None, bytes | None, list[tuple[str, bytes]]], Awaitable[object]]


class InvalidRecord(PoisonError, ValueError):
    """A record that decodes but breaks the contract; `reason` is a short machine code."""


class Record(Protocol):
    """A Kafka record as read: aiokafka's ConsumerRecord and SourceRecord both are one."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


class DeadLetters:
    """Dead-letters records with their reason. `send` returns once the record is queued,
    with the broker's acknowledgement (awaitable) or None; a stage awaits `acked()` before
    it commits offsets past what it dead-lettered."""

    def __init__(self, send: SendRaw) -> None:
        self._send = send
        self._unacked: set[asyncio.Future[Any]] = set()
        # Per source topic, a letter the broker refused since the topic's stage last
        # restarted: that stage must neither commit nor mark past it (the record is redone
        # from its committed offset, and its letter sent again).
        self._failed: dict[str, BaseException] = {}

    async def acked(self, topics: Iterable[str] = ()) -> None:
        """Until every letter sent so far is acknowledged by the broker; raises if one
        for a record of `topics` was refused since `clear` (before this was called)."""
        if self._unacked:
            await asyncio.gather(*self._unacked)
        failed = self.failure(topics)
        if failed is not None:
            raise RuntimeError(f"a dead letter was not written: {failed!r}") from failed

    def unacked(self) -> list[asyncio.Future[Any]]:
        """The letters sent so far that the broker has not acknowledged yet."""
        return list(self._unacked)

    def failure(self, topics: Iterable[str]) -> BaseException | None:
        """Why a letter for a record of these topics was not written, if one was not
        since `clear`."""
        return next((self._failed[t] for t in topics if t in self._failed), None)

    def clear(self, topics: Iterable[str]) -> None:
        """These topics' stage restarts from its committed offsets: it sends again."""
        for topic in topics:
            self._failed.pop(topic, None)

    def _settled(self, topic: str, future: asyncio.Future[Any]) -> None:
        self._unacked.discard(future)
        exc = asyncio.CancelledError() if future.cancelled() else future.exception()
        if exc is not None:
            self._failed.setdefault(topic, exc)
            log.error("a dead letter for a record of %s was not written: %r", topic, exc)

    async def put(
        self,
        record: Record,
        reason: str,
        error: BaseException | str,
        extra_headers: Sequence[tuple[str, bytes]] = (),
        dlq: str | None = None,
    ) -> Awaitable[object] | None:
        """Send the letter (to `dlq`, by default the record's topic's dead-letter topic);
        returns the broker's acknowledgement (acked() awaits it too)."""
        detail = str(error)[:1000]
        headers = [
            (H_REASON, reason.encode()),
            (H_ERROR, detail.encode()),
            (H_TOPIC, record.topic.encode()),
            (H_PARTITION, str(record.partition).encode()),
            (H_OFFSET, str(record.offset).encode()),
            (H_AT, str(int(time.time() * 1000)).encode()),
            *extra_headers,
        ]
        dlq = dlq or dlq_topic(record.topic)
        ack = await self._send(dlq, record.key, record.value, headers)
        future: asyncio.Future[Any] | None = None
        if inspect.isawaitable(ack):
            future = asyncio.ensure_future(ack)
            self._unacked.add(future)
            future.add_done_callback(functools.partial(self._settled, record.topic))
        metrics.DEAD_LETTERS.labels(dlq.removesuffix(DLQ_SUFFIX), reason).inc()
        log.warning(
            "dead-lettered %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            detail,
        )
        return future

    async def decoded(self, record: Record, decode: Callable[[bytes], T]) -> T | None:
        """`decode(value)`, or None once the record is dead-lettered with the reason.

        The one place a stage turns bytes it did not write into its types: an
        InvalidRecord keeps its own reason, anything that does not parse is a decode_error.
        """
        try:
            return decode(record.value or b"")
        except InvalidRecord as exc:
            await self.put(record, exc.reason, exc)
        except (DecodeError, ValueError, TypeError, UnicodeError) as exc:
            await self.put(record, "decode_error", f"{type(exc).__name__}: {exc}")
        return None


def source_of(event: Any) -> SourceRecord:
    """The Kafka record behind a Faust event, as read (before any deserialization)."""
    message = event.message
    return SourceRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
    )
