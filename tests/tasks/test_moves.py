"""Moves (tasks/status.py): batching of status moves and what an item's error does.

A unit test: the statuses are a stand-in that answers as the batch script does, per item.
The script itself runs against the real Redis in the task e2e tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from redis.exceptions import ResponseError

from resonance_task.tasks.status import Move, Moves


class Answers:
    """Per call, per item: what the batch script replied."""

    def __init__(self, *replies: dict[str, tuple[str, str]]) -> None:
        self.replies = list(replies)
        self.calls: list[list[str]] = []

    async def move(self, moves: Sequence[Move]) -> list[tuple[str, str]]:
        self.calls.append([m.task_id for m in moves])
        answer = self.replies.pop(0)
        return [answer.get(m.task_id, ("moved", "queued")) for m in moves]


async def test_an_item_refused_for_a_while_is_written_again_alone() -> None:
    statuses = Answers(
        {"b": ("error", "READONLY You can't write against a read only replica.")}, {}
    )
    moves = Moves(statuses)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(
        *(moves.move(Move(task_id, "running", "queued", {})) for task_id in "abc")
    )
    assert outcomes == [("moved", "queued")] * 3
    assert statuses.calls == [["a", "b", "c"], ["b"]]  # a and c took effect once


async def test_an_item_whose_key_holds_something_else_fails_alone() -> None:
    statuses = Answers({"b": ("error", "WRONGTYPE Operation against a key")})
    moves = Moves(statuses)  # type: ignore[arg-type]
    results: list[Any] = await asyncio.gather(
        *(moves.move(Move(task_id, "succeeded", "running", {})) for task_id in "abc"),
        return_exceptions=True,
    )
    assert results[0] == results[2] == ("moved", "queued")
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    assert statuses.calls == [["a", "b", "c"]]


@pytest.mark.parametrize("batches", [1, 3])
async def test_moves_made_together_go_in_one_batch(batches: int) -> None:
    statuses = Answers(*({} for _ in range(batches)))
    moves = Moves(statuses)  # type: ignore[arg-type]
    for n in range(batches):
        await asyncio.gather(*(moves.move(Move(f"{n}-{i}", "running", "*", {})) for i in range(50)))
    assert [len(call) for call in statuses.calls] == [50] * batches
