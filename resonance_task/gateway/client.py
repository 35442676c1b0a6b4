"""Push to gateways: one persistent PushStream per gateway, batched, with a bounded window.

A `GatewaySession` owns one gateway. Work arrives with `offer()`, which never waits: a
full queue is refused so the caller can divert (offline push) instead of letting one slow
gateway hold up every other gateway on the same partition. A writer packs queued items
into PushBatches (a message body once per batch, however many items carry it), at most
`window` batches are unacknowledged at once, and a reader matches PushBatchAcks to them.

When the stream breaks or an ack is late, unacknowledged items are sent again, first and
in order, on the next stream; after `max_attempts` they fail to offline push. A gateway
that answers UNIMPLEMENTED to PushStream (Resonance IM's own) gets unary Push calls
instead, in order within each session.

Every stream opens with an empty batch (batch_id 0), and the gateway's answer lists the
pushes (gateway-pushes partition, offset, index; msg_id) it answered lately and whom of
those it failed; a session whose worker was given partitions opens a new stream to ask
again. Items it already has are settled from that answer, not sent: what a gateway got
while the ack was in flight to a worker then SIGKILLed (or on a stream that broke) would
otherwise be pushed again by the next owner, a whole batch of it (measured: 0-1.75% of
the pushes of a run with three kills). A gateway that keeps nothing answers an empty
ack, and gets those pushes again, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from resonance_task.errors import Backoff
from resonance_task.gateway import tls
from resonance_task.gateway.tls import ChannelSecurity
from resonance_task.pipeline import metrics
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import (
    PushBatch,
    PushBatchAck,
    PushMessage,
    PushRequest,
    PushResponse,
)
from resonance_task.proto.resonance.gateway.v1.gateway_pb2_grpc import PushServiceStub

if TYPE_CHECKING:
    from resonance_task.settings import Settings

# Index of a push within its gateway-pushes record: the low bits of its position.
POSITION_INDEX_BITS = 20


def position(offset: int, index: int) -> int | None:
    """A push's position in its source; None past what the encoding holds."""
    return offset << POSITION_INDEX_BITS | index if index < 1 << POSITION_INDEX_BITS else None


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushOutcome:
    delivered: list[str]
    failed: list[str]
    # why `failed` failed: gateway_rejected, gateway_failed, gateway_unreachable,
    # gateway_timeout, gateway_unhealthy, gateway_overloaded
    reason: str = ""


@dataclass(eq=False)
class PushItem:
    message: PushMessage
    users: list[str]
    # Called in the loop turn the outcome is known; it must not block (what it has to
    # await, it schedules).
    on_done: Callable[[PushOutcome], None]
    metadata: Sequence[tuple[str, str]] = ()
    # (source, position): which push of which gateway-pushes partition it is; None for an
    # item that is not one (a test's, a retired session's hand-over keeps its own).
    position: tuple[str, int] | None = None
    attempts: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set once its outcome is handed to on_done: an item's offset counts on exactly one.
    finished: bool = False


@dataclass(frozen=True)
class SessionConfig:
    batch_max_items: int = 128
    batch_linger: float = 0.002
    window: int = 8
    queue_max_items: int = 10_000
    ack_timeout: float = 5.0
    connect_timeout: float = 2.0
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    max_attempts: int = 3
    # Items an unhealthy gateway gets while it has not acked again (the probe): a silent
    # gateway holds this many messages for an ack timeout, the rest go offline at once.
    probe_items: int = 8
    security: ChannelSecurity | None = None  # None: plaintext (a trusted network only)

    @property
    def backoff(self) -> Backoff:
        return Backoff(first=self.backoff_min, cap=self.backoff_max)

    @classmethod
    def from_settings(cls, s: Settings) -> SessionConfig:
        """The PUSH_* settings, as every gateway session of a worker uses them."""
        return cls(
            batch_max_items=s.push_batch_max_items,
            batch_linger=s.push_batch_linger_ms / 1000,
            window=s.push_window_batches,
            queue_max_items=s.push_queue_max_items,
            ack_timeout=s.push_ack_timeout_seconds,
            connect_timeout=s.push_connect_timeout_seconds,
            backoff_min=s.push_backoff_min_seconds,
            backoff_max=s.push_backoff_max_seconds,
            max_attempts=s.push_max_attempts,
            security=tls.from_settings(s),
        )


class _StreamBroken(Exception):
    pass


class _AckTimeout(_StreamBroken):
    pass


class _Unimplemented(Exception):
    pass


class _Reopen(Exception):
    """Partitions changed hands: ask the gateway again, on a new stream, what it has."""


# A gateway's answer to batch 0 lists tens of thousands of pushes: above gRPC's 4 MB
# default when user ids are long.
MAX_RECEIVE_BYTES = 32 * 1024 * 1024


def _is_ack_timeout(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # a unary Push's timeout
    return isinstance(exc, _AckTimeout)


class GatewaySession:
    def __init__(self, gateway_id: str, address: str, config: SessionConfig) -> None:
        self.gateway_id = gateway_id
        self.address = address
        self._config = config
        self._queue: deque[PushItem] = deque()
        self._retry: deque[PushItem] = deque()
        self._wakeup = asyncio.Event()
        # batch_id -> (items, each item's request index in the batch, when it was sent)
        self._inflight: OrderedDict[int, tuple[list[PushItem], list[int], float]] = OrderedDict()
        self._window_free = asyncio.Event()
        self._window_free.set()
        self._batch_ids = itertools.count(1)
        self._settled = asyncio.Event()  # set whenever an item is answered
        self._unary = False
        self._closing = False
        # From the gateway's answer to this stream's opening: per source, the sorted
        # positions it already has, and per msg_id the users of those it failed.
        self._received: dict[str, tuple[array[int], array[int]]] = {}  # positions, msg_ids
        self._received_failed: dict[int, set[str]] = {}
        self._reopen = False
        self.connected = False
        # False from a missed ack (connected, yet silent) until the gateway acks again.
        # A broken or refused connection alone does not count: a restarting gateway, or
        # one negotiating down to unary Push, is not silent.
        # Meanwhile it gets a few items (the probe) and everything else goes to
        # offline push at once: a silent gateway must not cost every message a timeout.
        self.healthy = True
        self.pushed_batches = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        # The labelled child, looked up once: a label lookup per offer was ~2% of a worker.
        self._depth_gauge = metrics.GATEWAY_QUEUE_DEPTH.labels(gateway_id)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"gateway-session:{self.gateway_id}")

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._retry)

    @property
    def inflight(self) -> int:
        return sum(len(items) for items, _, _ in self._inflight.values())

    @property
    def idle(self) -> bool:
        return not self._queue and not self._retry and not self._inflight

    def offer(self, item: PushItem) -> bool:
        """Queue an item; False if the queue is full, the session is closing, or the
        gateway is unhealthy and already has its probe batch."""
        if self._closing or len(self._queue) >= self._config.queue_max_items:
            return False
        if not self.healthy and self.depth + self.inflight >= self._config.probe_items:
            return False
        self._queue.append(item)
        self._wakeup.set()
        return True

    async def drain(self, deadline: float) -> list[PushItem]:
        """Stop taking work, wait until everything queued is answered or `deadline` passes.

        Returns what was left unanswered (queued, to retry, in flight): the caller decides
        whether it goes elsewhere or is left to be redone from the uncommitted offsets.
        """
        self._closing = True
        while not self.idle and (left := deadline - time.monotonic()) > 0:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), left)
        return await self.close()

    async def close(self) -> list[PushItem]:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = [item for batch, _, _ in self._inflight.values() for item in batch]
        left += [*self._retry, *self._queue]
        self._inflight.clear()
        self._retry.clear()
        self._queue.clear()
        return [item for item in left if not item.finished]

    def reopen(self) -> None:
        """This worker was given partitions: before pushing more, ask the gateway again
        what it has (another worker may have pushed them and died since this stream
        opened)."""
        if self.connected and not self._unary:
            self._reopen = True
            self._wakeup.set()

    def _channel(self) -> grpc.aio.Channel:
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        security = self._config.security
        if security is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        return grpc.aio.secure_channel(
            self.address, security.credentials, [*security.options(), *options]
        )

    async def _run(self) -> None:
        failures = 0
        while not (self._closing and self.idle):
            channel = self._channel()
            try:
                await asyncio.wait_for(channel.channel_ready(), self._config.connect_timeout)
                self._set_connected(True)
                failures = 0
                if self._unary:
                    await self._run_unary(_aio_stub(channel))
                else:
                    await self._run_stream(_aio_stub(channel))
            except (_Unimplemented, _Reopen) as exc:
                # Not a failure: unacknowledged work goes first on the next call, unchanged.
                if isinstance(exc, _Unimplemented):
                    log.info("gateway %s has no PushStream: using unary Push", self.gateway_id)
                    self._unary = True
                self._requeue_inflight(count_attempt=False)
                continue
            except Exception as exc:  # whatever broke this connection, the session lives on
                failures += 1
                self.failures += 1
                log.warning("gateway %s at %s: %r", self.gateway_id, self.address, exc)
                if _is_ack_timeout(exc):
                    self.healthy = False
                    # Connected, yet silent: what it holds has waited a whole ack timeout
                    # and resending it would wait as long again. Offline push takes it.
                    await self._give_up_all("gateway_timeout")
                else:
                    self._requeue_inflight(count_attempt=True)
            finally:
                self._set_connected(False)
                await channel.close(grace=None)
            await self._backoff(failures)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            metrics.GATEWAY_CONNECTED.inc() if connected else metrics.GATEWAY_CONNECTED.dec()

    async def _backoff(self, failures: int) -> None:
        until = time.monotonic() + self._config.backoff.delay(failures)
        # While the gateway is unreachable, work that has waited too long leaves for offline
        # push rather than sitting out the backoff.
        while True:
            await self._expire(self._config.ack_timeout)
            left = until - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    async def _expire(self, max_age: float) -> None:
        horizon = time.monotonic() - max_age
        expired: list[tuple[PushItem, PushOutcome]] = []
        for queue in (self._retry, self._queue):
            while queue and queue[0].enqueued_at < horizon:
                item = queue.popleft()
                reason = "gateway_failed" if item.attempts else "gateway_unreachable"
                expired.append((item, PushOutcome(delivered=[], failed=item.users, reason=reason)))
        self._finish_all(expired)

    def _requeue_inflight(self, *, count_attempt: bool) -> None:
        items = [item for batch, _, _ in self._inflight.values() for item in batch]
        self._inflight.clear()
        self._window_free.set()
        retry: list[PushItem] = []
        now = time.monotonic()
        for item in items:
            if count_attempt:
                item.attempts += 1
            item.enqueued_at = now  # the ack timeout counts again from the resend
            retry.append(item)
        # Unacknowledged work goes first, in its original order, before anything newer.
        self._retry.extendleft(reversed(retry))
        if retry:
            self._wakeup.set()

    async def _give_up_all(self, reason: str) -> None:
        items = [item for batch, _, _ in self._inflight.values() for item in batch]
        items += [*self._retry, *self._queue]
        # Out of the queues before any await: nothing else may see them again.
        self._inflight.clear()
        self._retry.clear()
        self._queue.clear()
        self._window_free.set()
        self._depth_gauge.set(0)
        self._finish_all(
            [(item, PushOutcome(delivered=[], failed=item.users, reason=reason)) for item in items]
        )

    async def _fail_exhausted(self) -> None:
        limit = self._config.max_attempts
        if not any(item.attempts >= limit for item in self._retry):
            return
        # Out of the queue before any await: nothing else may see them again.
        exhausted = [item for item in self._retry if item.attempts >= limit]
        self._retry = deque(item for item in self._retry if item.attempts < limit)
        self._finish_all(
            [
                (item, PushOutcome(delivered=[], failed=item.users, reason="gateway_failed"))
                for item in exhausted
            ]
        )

    async def _next_items(self) -> list[PushItem]:
        """Wait for work, linger briefly to fill the batch, and take up to a batch of it
        (what the gateway said it has is settled here instead)."""
        while True:
            await self._fail_exhausted()
            while not self._retry and not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._reopen and not self._unary:
                await self._reopen_when_acked()
            if len(self._queue) + len(self._retry) < self._config.batch_max_items:
                await asyncio.sleep(self._config.batch_linger)
            items: list[PushItem] = []
            while len(items) < self._config.batch_max_items and (self._retry or self._queue):
                items.append((self._retry or self._queue).popleft())
            self._depth_gauge.set(self.depth)
            if self._received:
                items = self._not_received(items)
            if items:
                return items

    async def _reopen_when_acked(self) -> None:
        """End this stream once what it carries is acknowledged (the watchdog bounds the
        wait): a batch cut off in flight might reach the gateway after it answered the
        next stream's question, and be pushed twice."""
        while self._inflight:
            self._settled.clear()
            await self._settled.wait()
        self._reopen = False
        raise _Reopen()

    def _not_received(self, items: list[PushItem]) -> list[PushItem]:
        """Settle the items the gateway already has, by its answer to batch 0; the rest."""
        send: list[PushItem] = []
        known: list[tuple[PushItem, PushOutcome]] = []
        for item in items:
            where = item.position
            had = self._received.get(where[0]) if where is not None else None
            if where is None or had is None:
                send.append(item)
                continue
            positions, msg_ids = had
            i = bisect_left(positions, where[1])
            if i == len(positions):
                # Past everything it had: so is, as a rule, what follows from this source
                # (taken in order), and the answer has served. An exception (a retired
                # session's leftovers) is only sent again.
                del self._received[where[0]]
                send.append(item)
            elif positions[i] != where[1] or msg_ids[i] != item.message.msg_id:
                send.append(item)
            else:
                failed_users = self._received_failed.get(item.message.msg_id, set())
                failed = [u for u in item.users if u in failed_users]
                delivered = [u for u in item.users if u not in failed_users]
                known.append((item, PushOutcome(delivered, failed, reason="gateway_rejected")))
        if not self._received:
            self._received_failed = {}
        if known:
            metrics.PUSHES_ALREADY_RECEIVED.inc(len(known))
            self._finish_all(known)
        return send

    async def _open(self, call: grpc.aio.StreamStreamCall[PushBatch, PushBatchAck]) -> None:
        """Ask what the gateway already has (batch 0), and keep its answer."""
        try:
            async with asyncio.timeout(self._config.ack_timeout):
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    # A call that already ended (UNIMPLEMENTED, say) says why on the read.
                    await call.write(PushBatch(batch_id=0))
                ack = await _read_ack(call)
        except TimeoutError:
            raise _AckTimeout(f"no answer to batch 0 within {self._config.ack_timeout}s") from None
        # Not `healthy` yet: answering this costs a gateway nothing; only an ack of pushes
        # shows it works.
        received: dict[str, tuple[array[int], array[int]]] = {}
        for had in ack.received:
            pairs = sorted(zip(had.positions, had.msg_ids, strict=False))
            if pairs:
                received[had.source] = (
                    array("Q", (p for p, _ in pairs)),
                    array("q", (m for _, m in pairs)),
                )
        self._received = received
        self._received_failed = {}
        for response in ack.failed:
            self._received_failed.setdefault(response.msg_id, set()).update(
                response.failed_usernames
            )

    async def _run_stream(self, stub: Any) -> None:
        call = stub.PushStream(metadata=self._metadata())
        try:
            await self._open(call)
        except BaseException:
            call.cancel()
            raise
        writer = asyncio.create_task(self._write_batches(call))
        reader = asyncio.create_task(self._read_acks(call))
        watchdog = asyncio.create_task(self._watch_acks())
        tasks = {writer, reader, watchdog}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if watchdog.done():
                watchdog.result()
            if writer.done() and not writer.cancelled() and isinstance(writer.exception(), _Reopen):
                writer.result()
            # The call's status says why it ended: a write to a finished call only says
            # "already finished", and may come first (a gateway without PushStream ends
            # the call at once, UNIMPLEMENTED).
            if writer.done() and not reader.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), self._config.connect_timeout)
            if reader.done():
                reader.result()
            writer.result()
            raise _StreamBroken("push stream ended")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            call.cancel()

    def _metadata(self) -> list[tuple[str, str]]:
        return [("x-resonance-gateway", self.gateway_id)]

    async def _write_batches(
        self, call: grpc.aio.StreamStreamCall[PushBatch, PushBatchAck]
    ) -> None:
        while True:
            while len(self._inflight) >= self._config.window:
                self._window_free.clear()
                await self._window_free.wait()
            items = await self._next_items()
            batch_id = next(self._batch_ids)
            batch, placed = _pack(batch_id, items)
            _add_positions(batch, items)
            self._inflight[batch_id] = (items, placed, time.monotonic())
            await call.write(batch)

    async def _read_acks(self, call: grpc.aio.StreamStreamCall[PushBatch, PushBatchAck]) -> None:
        while True:
            ack = await _read_ack(call)
            entry = self._inflight.pop(ack.batch_id, None)
            if entry is None:
                continue  # an ack for a batch already given up on and resent
            items, placed, sent_at = entry
            self.healthy = True
            self._window_free.set()
            metrics.PUSH_DURATION.observe(time.monotonic() - sent_at)
            self.pushed_batches += 1
            await self._settle(items, _unpack(placed, ack.results))

    async def _watch_acks(self) -> None:
        while True:
            await asyncio.sleep(min(0.1, self._config.ack_timeout / 4))
            if self._inflight:
                _, _, sent_at = next(iter(self._inflight.values()))
                if time.monotonic() - sent_at > self._config.ack_timeout:
                    raise _AckTimeout(f"no ack within {self._config.ack_timeout}s")

    async def _run_unary(self, stub: Any) -> None:
        while True:
            items = await self._next_items()
            batch_id = next(self._batch_ids)
            self._inflight[batch_id] = (items, list(range(len(items))), time.monotonic())
            by_session: dict[str, list[PushItem]] = {}
            for item in items:
                by_session.setdefault(item.message.session_id, []).append(item)
            # Sessions in parallel, each session's messages one after another: order holds.
            results = await asyncio.gather(
                *(self._unary_in_order(stub, group) for group in by_session.values())
            )
            responses = {id(item): r for group in results for item, r in group}
            del self._inflight[batch_id]
            self.healthy = True
            self.pushed_batches += 1
            await self._settle(items, [responses[id(item)] for item in items])

    async def _unary_in_order(
        self, stub: Any, items: list[PushItem]
    ) -> list[tuple[PushItem, PushResponse]]:
        answered = []
        for item in items:
            request = PushRequest(
                to_usernames=item.users, message=item.message, trace_headers=dict(item.metadata)
            )
            started = time.monotonic()
            response = await stub.Push(
                request,
                timeout=self._config.ack_timeout,
                metadata=[*self._metadata(), *item.metadata],
            )
            metrics.PUSH_DURATION.observe(time.monotonic() - started)
            answered.append((item, response))
        return answered

    async def _settle(self, items: list[PushItem], responses: list[PushResponse]) -> None:
        outcomes = []
        for item, response in zip(items, responses, strict=True):
            failed_names = set(response.failed_usernames)
            if response.error and not failed_names:
                failed_names = set(item.users)
            failed = [u for u in item.users if u in failed_names]
            delivered = [u for u in item.users if u not in failed_names]
            outcomes.append(
                (item, PushOutcome(delivered=delivered, failed=failed, reason="gateway_rejected"))
            )
        self._finish_all(outcomes)

    def _finish_all(self, outcomes: list[tuple[PushItem, PushOutcome]]) -> None:
        """Hand each item its outcome, once, in this loop turn.

        Synchronous, so a reader or writer cancelled halfway (the stream broke) cannot
        strand the rest unsettled, and an ack reaches the offset marks without waiting
        for a task to be scheduled: what a gateway got but the worker had not yet marked
        done is pushed again after a SIGKILL, and under load every loop turn in that path
        is milliseconds more of it.
        """
        todo = [(item, outcome) for item, outcome in outcomes if not item.finished]
        if not todo:
            return
        for item, _ in todo:
            item.finished = True
        self._settled.set()
        for item, outcome in todo:
            try:
                item.on_done(outcome)
            except Exception:
                # on_done owns its failures (push.py fails the record's effect); this
                # only keeps one item's handler from skipping the next ones.
                log.exception("push outcome handler failed for msg %s", item.message.msg_id)


async def _read_ack(call: grpc.aio.StreamStreamCall[PushBatch, PushBatchAck]) -> PushBatchAck:
    """The stream's next ack; why it ended, if it did."""
    try:
        ack = await call.read()
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise _Unimplemented() from exc
        raise
    if ack is grpc.aio.EOF:  # type: ignore[attr-defined]
        raise _StreamBroken("gateway closed the push stream")
    assert isinstance(ack, PushBatchAck)
    return ack


def _aio_stub(channel: grpc.aio.Channel) -> Any:
    # The generated stubs type the sync API; on an aio channel the calls are awaitable.
    return PushServiceStub(channel)


def _pack(batch_id: int, items: list[PushItem]) -> tuple[PushBatch, list[int]]:
    """Items -> PushRequests, a message body once however many items carry it.

    An item joins the request already holding its message unless one of its users has a
    later request in this batch: the gateway delivers in request order, and a user must
    see a conversation in order. Returns the batch and, per item, its request's index.
    """
    batch = PushBatch(batch_id=batch_id)
    by_msg: dict[int, int] = {}
    last_for_user: dict[str, int] = {}
    placed: list[int] = []
    for item in items:
        index = by_msg.get(item.message.msg_id)
        if index is None or any(last_for_user.get(u, -1) > index for u in item.users):
            index = len(batch.items)
            request = batch.items.add()
            request.message.CopyFrom(item.message)
            request.trace_headers.update(item.metadata)
            by_msg[item.message.msg_id] = index
        batch.items[index].to_usernames.extend(item.users)
        for user in item.users:
            last_for_user[user] = index
        placed.append(index)
    return batch, placed


def _add_positions(batch: PushBatch, items: list[PushItem]) -> None:
    by_source: dict[str, tuple[list[int], list[int]]] = {}
    for item in items:
        if item.position is not None:
            positions, msg_ids = by_source.setdefault(item.position[0], ([], []))
            positions.append(item.position[1])
            msg_ids.append(item.message.msg_id)
    for source, (positions, msg_ids) in by_source.items():
        batch.sent.add(source=source, positions=positions, msg_ids=msg_ids)


def _unpack(placed: list[int], results: Sequence[PushResponse]) -> list[PushResponse]:
    """The ack's results (one per request) back onto the items."""
    missing = PushResponse(error="no result in ack")  # a short ack failed the rest
    return [results[i] if i < len(results) else missing for i in placed]


class GatewayPool:
    """The sessions of this worker, one per gateway, created on first use."""

    def __init__(self, config: SessionConfig) -> None:
        self._config = config
        self._sessions: dict[str, GatewaySession] = {}
        self._retiring: set[asyncio.Task[Any]] = set()

    def session(self, gateway_id: str, address: str) -> GatewaySession:
        current = self._sessions.get(gateway_id)
        if current is not None and current.address == address:
            return current
        session = GatewaySession(gateway_id, address, self._config)
        session.start()
        self._sessions[gateway_id] = session
        if current is not None:
            # The gateway came back on another address: the old session drains on its own,
            # and what it could not settle moves on to the new one.
            task = asyncio.create_task(self._retire(current, session))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return session

    async def _retire(self, old: GatewaySession, new: GatewaySession) -> None:
        left = await old.drain(time.monotonic() + self._config.ack_timeout)
        overflow = []
        for item in left:
            item.enqueued_at = time.monotonic()
            if not new.offer(item):
                outcome = PushOutcome(delivered=[], failed=item.users, reason="gateway_overloaded")
                overflow.append((item, outcome))
        new._finish_all(overflow)

    def reopen(self) -> None:
        """Partitions changed hands: every open stream asks its gateway again what it has
        before it pushes more."""
        for session in self._sessions.values():
            session.reopen()

    def forget(self, gateway_id: str) -> None:
        """Close the session of a gateway gone for good, unless it still holds work.

        A session with work left keeps it: its items expire to offline push by themselves.
        """
        session = self._sessions.get(gateway_id)
        if session is None or not session.idle:
            return
        del self._sessions[gateway_id]
        task = asyncio.create_task(session.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(s.drain(deadline) for s in self._sessions.values()))
        self._sessions.clear()

    def stats(self) -> dict[str, dict[str, object]]:
        return {
            gid: {
                "address": s.address,
                "connected": s.connected,
                "healthy": s.healthy,
                "mode": "unary" if s._unary else "stream",
                "queued": s.depth,
                "inflight": s.inflight,
                "batches_acked": s.pushed_batches,
                "failures": s.failures,
            }
            for gid, s in self._sessions.items()
        }
