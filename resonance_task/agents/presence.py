"""presence: gateways' SyncStatusRequest batches -> per-user changes -> the routes changelog.

Two stages, each in a consumer group of its own and a fetched batch at a time
(stage/), as fanout and storage are: Faust's agents took ~1,500
presence updates a second through these two hops (one event, one table write and one
single-record changelog batch per change), so a reconnect storm of 15,000 users was
routable only after ~10 s and online users were sent to offline push meanwhile.

- `PresenceStage` (`<APP_ID>-presence`): gateways key their batches by gateway_id, and a
  user's route must live on the partition that owns the user, so it re-keys: per fetched
  batch, one `PresenceChanges` record per user partition of presence-by-user, changes in
  the order the gateways reported them, stamped with the oldest report's timestamp.
- `RoutesStage` (`<APP_ID>-routes`): on the worker owning the partition, applies the
  changes to the partition's routes (tables/routes.py: multi-device, out-of-order safe per
  connection) and writes each changed route once per batch to the routes changelog, at
  the same partition, stamped with its presence's timestamp (so every worker's view can
  tell how long a change took to reach it). A partition it takes over starts from this
  worker's view of the changelog, once that view has read the changelog's end as of the
  take-over; what the previous owner did not commit is applied again, which changes
  nothing (a change is applied only if newer than the connection's last).

Offsets commit once the broker has acknowledged what the batch produced, so a crash
loses nothing, and the presence fence (pipeline/fence.py) can follow a report through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from google.protobuf.message import DecodeError

from resonance_task.pipeline import metrics
from resonance_task.pipeline.backlog import OffsetProbe
from resonance_task.pipeline.dlq import DeadLetters, InvalidRecord
from resonance_task.pipeline.partitioning import partition_for
from resonance_task.pipeline.topic_view import TopicView
from resonance_task.proto.resonance.logic.v1.presence_pb2 import SyncStatusRequest
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import PresenceChange, PresenceChanges
from resonance_task.stage import GroupConsumer, Records, StageOptions, source_record
from resonance_task.tables import gateways as gateway_rules
from resonance_task.tables import routes as route_rules

log = logging.getLogger(__name__)

# (value, partition, timestamp ms) -> the broker's acknowledgement, once queued.
SendChanges = Callable[[bytes, int, int], Awaitable[Awaitable[object]]]
_CHANGES_OVERHEAD = 16


def read_sync(value: bytes | None) -> SyncStatusRequest:
    """A gateway's batch, or InvalidRecord saying why it cannot be one."""
    try:
        request = SyncStatusRequest.FromString(value or b"")
    except DecodeError as exc:
        raise InvalidRecord(
            "decode_error", f"not a resonance.logic.v1.SyncStatusRequest: {exc}"
        ) from exc
    if not request.gateway_id:
        raise InvalidRecord("invalid", "gateway_id is required")
    return request


def sync_changes(
    request: SyncStatusRequest, record_ts_ms: int, now_ms: int, max_skew_ms: int
) -> Iterator[dict[str, Any]]:
    """The request's changes as PresenceChange fields, in its order (online, then offline);
    timestamps at most `max_skew_ms` ahead of `now_ms`, users without a name left out."""
    gateway_id = request.gateway_id
    limit = now_ms + max_skew_ms
    for u in request.online_batch:
        if u.username:
            ts = u.timestamp or record_ts_ms
            yield {
                "username": u.username,
                "gateway_id": gateway_id,
                "conn_id": u.conn_id,
                "online": True,
                "timestamp": ts if ts <= limit else _clamped(ts, now_ms, max_skew_ms),
                "platform": u.platform,
                "remote_ip": u.remote_ip,
            }
    for gone in request.offline_batch:
        if gone.username:
            ts = gone.timestamp or record_ts_ms
            yield {
                "username": gone.username,
                "gateway_id": gateway_id,
                "conn_id": gone.conn_id,
                "online": False,
                "timestamp": ts if ts <= limit else _clamped(ts, now_ms, max_skew_ms),
            }


def _clamped(ts: int, now_ms: int, max_skew_ms: int) -> int:
    return gateway_rules.clamp_ts(ts, now_ms, max_skew_ms, "presence")


def decode_sync(
    value: bytes | None,
    record_ts_ms: int,
    now_ms: int | None = None,
    max_skew_ms: int = gateway_rules.DEFAULT_SKEW_MS,
) -> list[PresenceChange]:
    """A gateway's batch as per-user changes; timestamps at most `max_skew_ms` ahead."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    request = read_sync(value)
    return [PresenceChange(**f) for f in sync_changes(request, record_ts_ms, now, max_skew_ms)]


def decode_changes(value: bytes) -> list[PresenceChange]:
    """A presence-by-user record: a batch, or the single change earlier versions wrote."""
    batch = PresenceChanges.FromString(value)
    if batch.changes:
        return list(batch.changes)
    single = PresenceChange.FromString(value)
    return [single] if single.username else []


class PresenceStage(GroupConsumer):
    """presence -> presence-by-user: gateways' batches re-keyed by user partition."""

    def __init__(
        self,
        options: StageOptions,
        *,
        send: SendChanges,
        dead_letters: DeadLetters,
        partitions: int,
        record_max_bytes: int,
        max_skew_ms: int = gateway_rules.DEFAULT_SKEW_MS,
    ) -> None:
        self._send = send
        self._dead_letters = dead_letters
        self._partitions = partitions
        self._max_bytes = record_max_bytes
        self._max_skew_ms = max_skew_ms
        self.changes = 0
        super().__init__(options, stage="presence", dead_letters=dead_letters)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "changes": self.changes}

    async def handle(self, records: Records) -> Awaitable[object] | None:
        open_: dict[int, tuple[PresenceChanges, int]] = {}  # partition -> (batch, bytes)
        done: list[tuple[int, PresenceChanges]] = []
        now = int(time.time() * 1000)
        for record in records:
            request = await self._dead_letters.decoded(source_record(record), read_sync)
            if request is None:
                continue
            for fields in sync_changes(request, record.timestamp, now, self._max_skew_ms):
                partition = partition_for(fields["username"], self._partitions)
                batch, used = open_.get(partition) or (PresenceChanges(), _CHANGES_OVERHEAD)
                # Made in its record: a change made alone and appended would be copied.
                size = batch.changes.add(**fields).ByteSize() + 4
                if used + size > self._max_bytes and len(batch.changes) > 1:
                    del batch.changes[-1]  # it starts the partition's next record
                    done.append((partition, batch))
                    batch, used = PresenceChanges(), _CHANGES_OVERHEAD
                    batch.changes.add(**fields)
                open_[partition] = (batch, used + size)
                self.changes += 1
        done += [(partition, batch) for partition, (batch, _) in open_.items()]
        if not done:
            return None
        # The oldest report's time: how long presence takes to be routable is measured
        # from when the gateway published it.
        oldest = min(record.timestamp for record in records)
        acks = [
            await self._send(batch.SerializeToString(), partition, oldest)
            for partition, batch in done
        ]
        return asyncio.gather(*acks)


class RoutesStage(GroupConsumer):
    """presence-by-user -> the routes changelog, on the worker owning the users' partition."""

    def __init__(
        self,
        options: StageOptions,
        *,
        changelog: str,
        view: route_rules.RoutesView,
        changelog_view: TopicView,
        probe: OffsetProbe,
        producer_config: dict[str, Any],
        dead_letters: DeadLetters,
        keep_offline_seconds: float,
    ) -> None:
        self._changelog = changelog
        self._view = view
        self._changelog_view = changelog_view
        self._probe = probe
        self._producer_config = producer_config
        self._producer: AIOKafkaProducer | None = None
        self._dead_letters = dead_letters
        self._keep_ms = int(keep_offline_seconds * 1000)
        # The routes of the partitions this worker owns, ahead of its view by what it
        # wrote and the view has not read back yet: what the next change applies to.
        self._routes: dict[int, dict[str, bytes]] = {}
        self.applied = 0
        self.stale = 0
        self.takeovers = 0
        super().__init__(options, stage="routes", dead_letters=dead_letters)

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "applied": self.applied,
            "stale": self.stale,
            "takeovers": self.takeovers,
            "routes_owned": self.owned_routes,
        }

    @property
    def owned_routes(self) -> int:
        return sum(len(r) for r in self._routes.values())

    def owns(self, partition: int) -> bool:
        return partition in self._routes

    async def on_start(self) -> None:
        # Its own producer: a changelog batch holds many records (Faust's producer sends
        # topics named *-changelog one record a batch on Tansu, for Faust's own tables).
        self._producer = AIOKafkaProducer(**self._producer_config)
        await self._producer.start()
        await super().on_start()

    async def on_stop(self) -> None:
        await super().on_stop()
        if self._producer is not None:
            await self._producer.stop()

    def released(self, tps: set[TopicPartition] | None) -> None:
        # What was applied here but maybe not written must be taken from the changelog
        # again: kept, it would make the redone changes look stale, and never be written.
        if tps is None:
            self._routes.clear()
        else:
            for tp in tps:
                self._routes.pop(tp.partition, None)

    async def _take_over(self, partition: int) -> dict[str, bytes]:
        ends = await self._probe.ends(self._changelog, [partition])
        await self._changelog_view.wait_positions(ends)
        self.takeovers += 1
        routes = self._routes[partition] = self._view.partition(partition)
        return routes

    async def handle(self, records: Records) -> Awaitable[object] | None:
        now = int(time.time() * 1000)
        changed: dict[int, dict[str, tuple[bytes | None, int]]] = {}
        applied = stale = 0
        for record in records:
            partition = record.partition
            routes = self._routes.get(partition)
            if routes is None:
                routes = await self._take_over(partition)
            changes = await self._dead_letters.decoded(source_record(record), decode_changes)
            out = changed.setdefault(partition, {})
            for change in changes or ():
                user = change.username
                before = routes.get(user)
                rows = route_rules.apply_to_rows(
                    route_rules.rows_of(before) if before else [],
                    change,
                    now_ms=now,
                    keep_offline_ms=self._keep_ms,
                )
                if rows is None:
                    stale += 1
                    continue
                applied += 1
                if rows:
                    routes[user] = value = route_rules.encode_rows(rows)
                    out[user] = (value, record.timestamp)
                elif before is not None:
                    del routes[user]
                    out[user] = (None, record.timestamp)
        self.applied += applied
        self.stale += stale
        metrics.PRESENCE_CHANGES.labels("applied").inc(applied)
        metrics.PRESENCE_CHANGES.labels("stale").inc(stale)
        acks = [await ack for ack in self._write(changed)]
        return asyncio.gather(*acks) if acks else None

    def _write(
        self, changed: dict[int, dict[str, tuple[bytes | None, int]]]
    ) -> list[Awaitable[Awaitable[object]]]:
        """Each partition's changed routes, one record a user, in as few batches as fit."""
        producer = self._producer
        assert producer is not None
        sends = []
        for partition, routes in changed.items():
            batch = producer.create_batch()
            for user, (value, stamp) in routes.items():
                key = route_rules.changelog_key(user)
                if batch.append(key=key, value=value, timestamp=stamp) is None:
                    sends.append(producer.send_batch(batch, self._changelog, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=stamp)
            if batch.record_count():
                sends.append(producer.send_batch(batch, self._changelog, partition=partition))
        return sends
