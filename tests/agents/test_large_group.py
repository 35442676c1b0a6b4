"""large_group unit tests: paging, cursor saves and resume, read diffusion (no broker)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from redis.exceptions import ResponseError

from resonance_task.agents.large_group import Cursor
from resonance_task.pipeline.deliveries import session_partition
from resonance_task.pipeline.dlq import SourceRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import LargeGroupJob
from resonance_task.stores.inbox import WriteResult
from resonance_task.stores.members import UnpageableGroup
from tests.agents.large_groups import GROUP, PARTITIONS, Harness, job


async def test_pages_every_member_once_and_saves_the_cursor_per_page() -> None:
    h = Harness(GROUP)
    assert await h.run(job(from_username="admin")) == 3
    assert sorted(h.users()) == sorted([*GROUP, "admin"])  # the sender's inbox too, once
    assert h.saves == [1, 2, 3]
    assert h.cursors["99"]["done"] and h.cursors["99"]["partition"] == 2
    for partition, batch in h.sink.deliveries:
        assert partition == session_partition("big", PARTITIONS)
        assert all(d.message.msg_id == 99 for d in batch.deliveries)
    assert sorted(h.pages()) == [0, 1, 2]
    # Pages are pushed as fanout would: online members, the rest offline, never the sender.
    assert sorted(h.sink.pushed()["g1"]) == GROUP[::2]
    assert h.sink.offline_users() == sorted(GROUP[1::2])
    # A finished job replayed (its offset commit was lost) does nothing.
    h.sink.deliveries.clear()
    assert await h.run(job()) == 0 and h.sink.deliveries == []


async def test_a_window_of_pages_runs_ahead_of_the_saved_cursor() -> None:
    h = Harness(GROUP, page_size=50, window=3)
    sent_at_save: list[int] = []
    save = h.save

    async def recording_save(key: str, cursor: Cursor) -> None:
        sent_at_save.append(len(h.pages()))
        await save(key, cursor)

    h.groups._save_cursor = recording_save
    assert await h.run(job()) == 5
    assert h.saves == [1, 2, 3, 4, 5] and h.cursors["99"]["done"]
    # Page k's cursor is saved while pages k+1.. are already out, never more than 3 ahead.
    assert [sent - saved for sent, saved in zip(sent_at_save, h.saves, strict=True)] == [
        2,
        2,
        2,
        1,
        0,
    ]
    assert sorted(h.users()) == GROUP


async def test_resumes_after_the_last_finished_page() -> None:
    h = Harness(GROUP)
    h.cursors["99"] = Cursor(after="m0099", pages=1, done=False, at=0, partition=2)
    assert await h.run(job(from_username="m0007")) == 2
    assert sorted(h.users()) == GROUP[100:]  # neither page 0 nor the sender again
    assert h.pages() == {1, 2}


async def test_excluded_members_and_record_size_bound() -> None:
    h = Harness(GROUP, page_size=250, max_users=10)
    await h.run(job(exclude_usernames=["m0001", "m0002"]))
    assert sorted(h.users()) == [u for u in GROUP if u not in ("m0001", "m0002")]
    assert max(len(d.users) for d in h.sink.delivered()) == 10


async def test_read_diffusion_writes_the_timeline_once_and_pushes_online_only() -> None:
    h = Harness(GROUP)
    await h.run(job(read=True, from_username="m0007"))
    assert h.timeline.appended == [99]
    assert h.sink.deliveries == []  # the timeline holds it: no inbox copies
    assert sorted(h.sink.pushed()["g1"]) == [u for u in GROUP[::2] if u != "m0007"]
    assert h.sink.offline == []  # online members only

    persist_only = Harness(GROUP)
    await persist_only.run(
        LargeGroupJob(
            event=PushEvent(msg_id=5, session_id="big", session_type=2, persist_only=True),
            read_diffusion=True,
        )
    )
    assert persist_only.timeline.appended == [5]
    assert persist_only.sink.deliveries == [] and persist_only.sink.pushes == []


async def test_undecodable_job_is_dead_lettered() -> None:
    h = Harness(GROUP)
    await h.groups.handle(SourceRecord("jobs", 0, 1, None, b"\xff\xff"))
    assert h.dead == ["decode_error"] and h.sink.deliveries == []


async def test_a_group_the_store_cannot_page_is_dead_lettered() -> None:
    h = Harness(GROUP)

    async def refuse(session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        raise UnpageableGroup("member_store_wrong_type", "group:{big}:members is a hash")

    h.members.page = refuse  # type: ignore[method-assign]
    assert await h.run(job()) == 0
    assert h.dead == ["member_store_wrong_type"]


async def test_a_failed_send_resumes_the_job_from_its_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: 0.0)
    h = Harness(GROUP)
    deliveries = h.groups._out.deliveries
    calls = 0

    async def broker_away_once(key: bytes | None, value: bytes, p: int | None) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # page 1's records: the broker is briefly gone
            raise KafkaConnectionError("broker away")
        return await deliveries(key, value, p)

    h.groups._out = replace(h.groups._out, deliveries=broker_away_once)
    await h.run(job())
    # Nothing escaped the agent, every member reached, page 0 not sent again.
    assert sorted(h.users()) == GROUP
    assert h.saves == [1, 2, 3] and h.cursors["99"]["done"] and h.dead == []


async def test_a_job_that_keeps_failing_is_dead_lettered_not_retried_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: 0.0)
    h = Harness(GROUP)

    async def bug(key: bytes | None, value: bytes, p: int | None) -> Any:
        raise ValueError("a bug, not an outage")

    h.groups._out = replace(h.groups._out, deliveries=bug)
    assert await h.run(job()) == 0
    assert h.dead == ["job_failed"]


async def test_no_member_is_routed_before_the_views_are_current() -> None:
    views_current = asyncio.Event()
    h = Harness(GROUP)
    h.groups._ready = views_current.wait
    running = asyncio.ensure_future(h.run(job()))
    await asyncio.sleep(0.1)
    assert not running.done() and h.sink.pushes == []
    views_current.set()
    assert await running == 3


async def test_the_next_member_page_is_read_while_a_page_is_sent_and_saved() -> None:
    h = Harness(GROUP)
    log: list[str] = []
    page, save = h.members.page, h.groups._save_cursor

    async def logged_page(session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        log.append(f"read after {after or 'start'}")
        return await page(session_id, after, count)

    async def logged_save(key: str, cursor: Cursor) -> None:
        log.append(f"save {cursor['pages']}")
        await save(key, cursor)

    h.members.page = logged_page  # type: ignore[method-assign]
    h.groups._save_cursor = logged_save
    assert await h.run(job()) == 3
    # Page 3's read does not wait for page 1's cursor save (a member page may queue
    # behind inbox writes on the same Redis: reading ahead hides that wait).
    assert log.index("read after m0199") < log.index("save 1")
    assert [e for e in log if e.startswith("save")] == ["save 1", "save 2", "save 3"]


async def test_a_timeline_key_of_the_wrong_type_dead_letters_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: 0.0)
    h = Harness(GROUP)
    tries = 0

    async def wrong_type(messages: Sequence[PushMessage]) -> WriteResult:
        nonlocal tries
        tries += 1
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    h.timeline.append = wrong_type  # type: ignore[method-assign]
    assert await h.run(job(read=True)) == 0
    # Poison to the error policy: set aside at once, with the reason, never retried.
    assert h.dead == ["wrong_type"] and tries == 1


async def test_a_long_recipient_list_is_paged_from_the_event_and_bad_ids_refused() -> None:
    h = Harness(GROUP[:10])  # the member store is not read for an explicit list
    listed = [f"r{i:04d}" for i in range(230)] + ["bad\x00id", ""]
    event = PushEvent(msg_id=98, session_id="dm-fan", from_username="admin", to_usernames=listed)
    assert (
        await h.groups.handle(
            SourceRecord("jobs", 2, 8, b"dm-fan", LargeGroupJob(event=event).SerializeToString())
        )
        == 3
    )
    assert sorted(h.users()) == sorted(["admin", *listed[:-2]])
    assert h.saves == [1, 2, 3] and h.cursors["98"]["done"]
    assert h.dead == ["invalid_user_id"]
    (letter,) = [PushEvent.FromString(v or b"") for v in h.sink.dead_values]
    # An empty name is refused like any unusable id: dead-lettered, not dropped unseen.
    assert list(letter.to_usernames) == ["bad\x00id", ""]
