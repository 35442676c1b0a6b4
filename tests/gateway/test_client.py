"""GatewaySession against real grpc.aio gateway servers (the simulator, gRPC side only)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from resonance_task.embedded.broker import free_port
from resonance_task.gateway import simulator
from resonance_task.gateway.client import (
    GatewayPool,
    PushItem,
    PushOutcome,
    SessionConfig,
    position,
)
from resonance_task.gateway.simulator import GatewaySimulator
from tests.gateway.sessions import FAST, Outcomes, message


@pytest.fixture
async def gateway() -> AsyncIterator[GatewaySimulator]:
    sim = await GatewaySimulator("gw-test", bootstrap_servers=None).start()
    await sim.connect([f"u{i}" for i in range(10)])
    yield sim
    await sim.stop()


async def test_batches_carry_each_body_once_and_ack(gateway: GatewaySimulator) -> None:
    pool = GatewayPool(FAST)
    outcomes = Outcomes()
    session = pool.session(gateway.gateway_id, gateway.address)
    # Three items of one message (as from three user-partitions) and one of another.
    for users in (["u0", "u1"], ["u2"], ["u3", "u4"]):
        assert session.offer(PushItem(message(1), users, outcomes.handler(1)))
    assert session.offer(PushItem(message(2, seq=2), ["u5"], outcomes.handler(2)))
    await outcomes.wait(4)
    await pool.drain(1)
    assert sorted(u for _, o in outcomes.items for u in o.delivered) == [
        "u0",
        "u1",
        "u2",
        "u3",
        "u4",
        "u5",
    ]
    assert all(not o.failed for _, o in outcomes.items)
    for msg_ids in gateway.recorder.calls:
        assert len(msg_ids) == len(set(msg_ids)), "a batch carried a body twice"
    assert gateway.recorder.bodies == len({m for call in gateway.recorder.calls for m in call}) == 2


async def test_failed_usernames_come_back_as_failed(gateway: GatewaySimulator) -> None:
    gateway.fail_users = {"u1"}
    pool = GatewayPool(FAST)
    outcomes = Outcomes()
    pool.session(gateway.gateway_id, gateway.address).offer(
        PushItem(message(3), ["u0", "u1", "nobody"], outcomes.handler(3))
    )
    await outcomes.wait(1)
    await pool.drain(1)
    ((_, outcome),) = outcomes.items
    assert outcome.delivered == ["u0"]
    assert outcome.failed == ["u1", "nobody"]
    assert outcome.reason == "gateway_rejected"


async def test_order_within_a_session_holds(gateway: GatewaySimulator) -> None:
    pool = GatewayPool(FAST)
    outcomes = Outcomes()
    session = pool.session(gateway.gateway_id, gateway.address)
    for seq in range(1, 301):
        assert session.offer(PushItem(message(1000 + seq, seq=seq), ["u0"], outcomes.handler(seq)))
    await outcomes.wait(300)
    await pool.drain(1)
    seqs = [r.seq_id for r in gateway.recorder.deliveries]
    assert seqs == list(range(1, 301))
    assert gateway.recorder.batches < 300, "items were not batched"


async def test_unary_only_gateway_gets_everything_in_order() -> None:
    sim = await GatewaySimulator("gw-unary", bootstrap_servers=None, stream=False).start()
    await sim.connect(["u0", "u1"])
    pool = GatewayPool(FAST)
    outcomes = Outcomes()
    session = pool.session(sim.gateway_id, sim.address)
    for seq in range(1, 51):
        session.offer(PushItem(message(seq, seq=seq), ["u0", "u1"], outcomes.handler(seq)))
    await outcomes.wait(50)
    await pool.drain(1)
    await sim.stop()
    assert sim.recorder.batches == 0 and sim.recorder.unary_calls == 50
    assert [r.seq_id for r in sim.recorder.deliveries if r.user == "u0"] == list(range(1, 51))
    assert pool.stats() == {}


async def test_a_silent_gateway_costs_one_ack_timeout_then_gets_only_a_probe() -> None:
    sim = await GatewaySimulator("gw-mute", bootstrap_servers=None, ack=False).start()
    await sim.connect([f"u{i}" for i in range(10)])
    config = dataclasses.replace(FAST, probe_items=4)
    pool = GatewayPool(config)
    outcomes = Outcomes()
    session = pool.session(sim.gateway_id, sim.address)
    for i in range(3):
        assert session.offer(PushItem(message(i, f"s{i}"), [f"u{i}"], outcomes.handler(i)))
    started = asyncio.get_running_loop().time()
    await outcomes.wait(3, seconds=5)
    waited = asyncio.get_running_loop().time() - started
    # Given up after one ack timeout, not resent: offline push takes them.
    assert {o.reason for _, o in outcomes.items} == {"gateway_timeout"}
    assert waited < config.ack_timeout * 2, waited
    # It never answered the stream's opening, so nothing was sent to it.
    assert sim.recorder.openings == 1 and sim.recorder.batches == 0 and not session.healthy

    # Unhealthy: a few items go to it as a probe, the rest is refused at once.
    accepted = [
        i
        for i in range(10, 20)
        if session.offer(PushItem(message(i, f"s{i}"), [f"u{i - 10}"], outcomes.handler(i)))
    ]
    assert accepted == [10, 11, 12, 13]
    sim.ack = True  # it recovers: the probe is acked, and it takes full work again
    await outcomes.wait(7, seconds=5)
    assert [o.delivered for i, o in outcomes.items if i >= 10] == [["u0"], ["u1"], ["u2"], ["u3"]]
    assert session.healthy
    assert all(
        session.offer(PushItem(message(i), ["u9"], outcomes.handler(i))) for i in range(20, 40)
    )
    await outcomes.wait(27, seconds=5)
    await pool.drain(0.5)
    await sim.stop()
    assert session.failures == 1


async def test_unreachable_gateway_diverts_after_ack_timeout() -> None:
    pool = GatewayPool(FAST)
    outcomes = Outcomes()
    session = pool.session("gw-gone", f"127.0.0.1:{free_port()}")
    session.offer(PushItem(message(10), ["u0"], outcomes.handler(10)))
    await outcomes.wait(1, seconds=10)
    await pool.drain(0.1)
    ((_, outcome),) = outcomes.items
    assert outcome.failed == ["u0"] and outcome.reason == "gateway_unreachable"


async def test_full_queue_is_refused_not_awaited() -> None:
    pool = GatewayPool(SessionConfig(queue_max_items=2, connect_timeout=0.2, ack_timeout=0.3))
    session = pool.session("gw-gone", f"127.0.0.1:{free_port()}")

    def ignore(outcome: PushOutcome) -> None:
        return None

    assert session.offer(PushItem(message(1), ["u0"], ignore))
    assert session.offer(PushItem(message(2), ["u0"], ignore))
    assert not session.offer(PushItem(message(3), ["u0"], ignore))
    await pool.drain(0)


async def test_every_item_settles_exactly_once_when_the_stream_breaks_mid_settle(
    gateway: GatewaySimulator,
) -> None:
    # Outcome handlers slower than the ack timeout: while the reader settles one batch,
    # the next batch's ack waits unread, and the watchdog breaks the stream. A broken
    # stream may neither strand an item nor settle it twice.
    config = SessionConfig(
        batch_max_items=5,
        batch_linger=0.001,
        ack_timeout=0.3,
        connect_timeout=0.3,
        backoff_min=0.05,
        backoff_max=0.1,
        max_attempts=3,
    )
    pool = GatewayPool(config)
    seen: dict[int, int] = {}

    def slow(msg_id: int) -> Callable[[PushOutcome], Any]:
        def on_done(outcome: PushOutcome) -> None:
            time.sleep(0.12)  # blocks the loop, as a handler that misbehaves would
            seen[msg_id] = seen.get(msg_id, 0) + 1

        return on_done

    session = pool.session(gateway.gateway_id, gateway.address)
    for i in range(1, 31):
        assert session.offer(PushItem(message(i, session=f"s{i}"), ["u0"], slow(i)))
    for _ in range(400):
        if len(seen) == 30:
            break
        await asyncio.sleep(0.05)
    await pool.drain(5.0)  # until nothing is in flight: a second outcome would be in by then
    assert session.failures >= 1, "the stream never broke: the test proves nothing"
    assert seen == dict.fromkeys(range(1, 31), 1)


async def test_a_gateway_on_a_new_address_takes_over_what_the_old_one_left(
    gateway: GatewaySimulator,
) -> None:
    pool = GatewayPool(FAST)
    outcomes = Outcomes()
    old = pool.session(gateway.gateway_id, f"127.0.0.1:{free_port()}")  # nobody there
    for i in range(1, 4):
        assert old.offer(PushItem(message(i, session=f"s{i}"), [f"u{i}"], outcomes.handler(i)))
    pool.session(gateway.gateway_id, gateway.address)  # the gateway's next heartbeat
    await outcomes.wait(3)
    await pool.drain(1)
    assert sorted(u for _, o in outcomes.items for u in o.delivered) == ["u1", "u2", "u3"]
    assert all(not o.failed for _, o in outcomes.items)


def at(offset: int, index: int) -> tuple[str, int]:
    """A push's (source, position), as the push stage gives it."""
    where = position(offset, index)
    assert where is not None
    return ("pushes/0", where)


def offer_at(
    session: Any, outcomes: Outcomes, msg_id: int, users: list[str], offset: int, index: int = 0
) -> None:
    """Offer msg_id to users as the push at (offset, index) of partition 0."""
    item = PushItem(message(msg_id, f"s{msg_id}"), users, outcomes.handler(msg_id))
    item.position = at(offset, index)
    assert session.offer(item)


async def test_a_worker_taking_over_gets_what_the_gateway_already_has_from_its_answer(
    gateway: GatewaySimulator,
) -> None:
    # One worker pushed these and died before it read the acks (or marked them done): the
    # next owner of the partition offers them again, at the same positions, and the
    # gateway's answer to its stream's opening settles them, failures included.
    gateway.fail_users = {"u2"}
    first, first_outcomes = GatewayPool(FAST), Outcomes()
    session = first.session(gateway.gateway_id, gateway.address)
    for i in range(1, 6):
        offer_at(session, first_outcomes, i, ["u1", "u2"], 100, i)
    await first_outcomes.wait(5)
    await first.drain(1)
    assert gateway.recorder.bodies == 5

    after, outcomes = GatewayPool(FAST), Outcomes()
    session = after.session(gateway.gateway_id, gateway.address)
    for i in range(1, 8):  # the five again, and two it never had
        offer_at(session, outcomes, i, ["u1", "u2"], 100, i)
    # The same position of another message (the topic was recreated): not the same push.
    offer_at(session, outcomes, 50, ["u1"], 100, 1)
    await outcomes.wait(8)
    await after.drain(1)
    assert gateway.recorder.bodies == 8, "the gateway was sent what it had"
    assert gateway.recorder.openings == 2
    assert sorted((i, o.delivered, o.failed) for i, o in outcomes.items) == [
        *[(i, ["u1"], ["u2"]) for i in range(1, 8)],
        (50, ["u1"], []),
    ]
    delivered = [(r.msg_id, r.user) for r in gateway.recorder.deliveries]
    assert sorted(delivered) == [*[(i, "u1") for i in range(1, 8)], (50, "u1")]


async def test_a_gateway_that_keeps_nothing_gets_them_again() -> None:
    sim = await GatewaySimulator("gw-plain", bootstrap_servers=None, resume=False).start()
    await sim.connect(["u1"])
    for _ in range(2):
        pool, outcomes = GatewayPool(FAST), Outcomes()
        offer_at(pool.session(sim.gateway_id, sim.address), outcomes, 1, ["u1"], 7)
        await outcomes.wait(1)
        await pool.drain(1)
        assert outcomes.items[0][1].delivered == ["u1"]
    await sim.stop()
    assert [(r.msg_id, r.user) for r in sim.recorder.deliveries] == [(1, "u1"), (1, "u1")]


async def test_a_worker_given_partitions_asks_again_on_a_stream_it_had_open(
    gateway: GatewaySimulator,
) -> None:
    # A surviving worker takes the partitions of one that died: its own stream to the
    # gateway opened before the other pushed, so its answer then knows nothing of it.
    survivor, outcomes = GatewayPool(FAST), Outcomes()
    session = survivor.session(gateway.gateway_id, gateway.address)
    offer_at(session, outcomes, 1, ["u1"], 10)
    await outcomes.wait(1)

    died, died_outcomes = GatewayPool(FAST), Outcomes()
    other = died.session(gateway.gateway_id, gateway.address)
    for i in range(2, 6):
        offer_at(other, died_outcomes, i, ["u1"], 20, i)
    await died_outcomes.wait(4)
    await died.drain(1)

    survivor.reopen()  # the push stage, given the partitions
    for i in range(2, 7):
        offer_at(session, outcomes, i, ["u1"], 20, i)
    await outcomes.wait(6)
    await survivor.drain(1)
    assert gateway.recorder.openings == 3
    assert [(r.msg_id, r.user) for r in gateway.recorder.deliveries] == [
        (i, "u1") for i in range(1, 7)
    ]
    assert session.failures == 0, "asking again is not a failure"


async def test_the_gateway_forgets_failures_with_their_pushes_not_before(
    monkeypatch: pytest.MonkeyPatch, gateway: GatewaySimulator
) -> None:
    monkeypatch.setattr(simulator, "RESUME_POSITIONS", 2)
    gateway.fail_users = {f"f{i}" for i in range(6)}
    pool, outcomes = GatewayPool(FAST), Outcomes()
    session = pool.session(gateway.gateway_id, gateway.address)

    async def push(msg_id: int, users: list[str], offset: int) -> None:
        offer_at(session, outcomes, msg_id, users, offset)
        await outcomes.wait(len(outcomes.items) + 1)

    await push(1, ["u0", *sorted(gateway.fail_users)], 1)  # six failures, one push
    await push(2, ["u0"], 2)
    answer = gateway._opening_answer()
    assert [list(r.positions) for r in answer.received] == [[at(1, 0)[1], at(2, 0)[1]]]
    assert {r.msg_id: len(r.failed_usernames) for r in answer.failed} == {1: 6}
    await push(3, ["u0"], 3)  # the first push goes, and its failures with it
    answer = gateway._opening_answer()
    assert [list(r.msg_ids) for r in answer.received] == [[2, 3]]
    assert list(answer.failed) == []
    await pool.drain(1)
