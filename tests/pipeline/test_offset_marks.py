"""Offset marks written by their own thread, against the real Redis."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiokafka import TopicPartition

from resonance_task.embedded.broker import free_port
from resonance_task.pipeline.offset_marks import OffsetMarks
from tests.kafka import until


async def _until_loaded(
    marks: OffsetMarks, group: str, want: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        loaded = await marks.load(group, want)
        if loaded == want:
            return loaded
        await asyncio.sleep(0.01)
    return await marks.load(group, want)


async def test_posted_marks_are_written_without_the_event_loop(redis_url: str, tag: str) -> None:
    marks = OffsetMarks(redis_url, tag)
    a, b = TopicPartition(f"{tag}.t", 0), TopicPartition(f"{tag}.t", 1)
    other = TopicPartition(f"{tag}.u", 3)
    try:
        for offset in range(1, 200):  # a burst of moves: the latest of each partition wins
            marks.post("g", {a: offset, b: 2 * offset})
        marks.post("g2", {other: 9})
        # The loop is held, as a busy worker's is: the thread writes all the same.
        time.sleep(0.5)  # noqa: ASYNC251 (the point: no await, no loop turn)
        assert await _until_loaded(marks, "g", {a: 199, b: 398}) == {a: 199, b: 398}
        assert await _until_loaded(marks, "g2", {other: 9}) == {other: 9}
    finally:
        await marks.close()


async def test_what_was_posted_before_close_is_written(redis_url: str, tag: str) -> None:
    marks = OffsetMarks(redis_url, tag)
    tp = TopicPartition(f"{tag}.t", 0)
    marks.post("g", {tp: 41})
    await marks.close()
    reader = OffsetMarks(redis_url, tag)
    try:
        assert await reader.load("g", [tp]) == {tp: 41}
    finally:
        await reader.close()


async def test_without_redis_marks_are_a_warning_and_close_still_ends(
    tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    marks = OffsetMarks(f"redis://127.0.0.1:{free_port()}/0", tag, timeout=0.2)
    caplog.set_level(logging.WARNING, "resonance_task.pipeline.offset_marks")
    marks.post("g", {TopicPartition(f"{tag}.t", 0): 5})
    await until(lambda: any("offset marks not saved" in r.getMessage() for r in caplog.records))
    started = time.monotonic()
    await marks.close()
    assert time.monotonic() - started < 3
    assert any("offset marks not saved" in r.getMessage() for r in caplog.records)
