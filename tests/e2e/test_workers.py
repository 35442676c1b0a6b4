"""Several workers of one app: every push and every inbox entry, counted, however they start.

What a new user tried first: `faust -A resonance_task.app worker` twice (same APP_ID, own
data dirs and web ports), 4 partitions, two gateways heartbeating, 400 events to 200 users. With the
gateways in a Faust GlobalTable one worker kept an empty table in 3 runs of 4 and sent
~1,700 online users to offline push. Here each count is exact.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from resonance_task.commands.traffic import mixed_traffic
from resonance_task.embedded.expectations import Expected, expected, pushed_in_order, received
from resonance_task.embedded.worker import WorkerProcess
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from tests.harness import Pipeline, PipelineFactory, eventually

pytestmark = pytest.mark.slow

USERS = 200
EVENTS = 400


async def start_workers(p: Pipeline, count: int, how: str) -> list[WorkerProcess]:
    names = [f"worker-{i + 1}" for i in range(count)]
    if how == "together":
        return list(await asyncio.gather(*(p.start_worker(name) for name in names)))
    return [await p.start_worker(name) for name in names]  # each ready before the next


async def every_worker_sees(p: Pipeline, workers: list[WorkerProcess], online: int) -> None:
    """Each worker's own views hold both gateways (up) and every online user."""

    async def seen() -> bool:
        for worker in workers:
            status, gateways = await asyncio.to_thread(worker.get, "/gateways")
            _, stats = await asyncio.to_thread(worker.get, "/stats")
            up = [g for g in gateways["gateways"] if g["status"] == "up"]
            if status != 200 or len(up) != 2 or stats["online_users"] != online:
                return False
        return True

    await eventually(seen, 60, "both gateways and every online user on every worker")


async def setup(
    p: Pipeline, group_count: int = 3, spacing: int = 40
) -> tuple[list[str], dict[str, list[str]], set[str]]:
    """USERS users, groups of 60 `spacing` apart, 3/4 online on two gateways."""
    users = [p.user(i) for i in range(USERS)]
    groups = {f"{p.tag}-g{g}": users[g * spacing : g * spacing + 60] for g in range(group_count)}
    for session_id, members in groups.items():
        await p.members.add(session_id, members)
    online = users[: USERS * 3 // 4]
    await p.gateway("gw-1", online[: len(online) // 2])
    await p.gateway("gw-2", online[len(online) // 2 :])
    return users, groups, set(online)


async def check_exact(
    p: Pipeline, users: list[str], want: Expected, *, duplicates_allowed: bool = False
) -> None:
    async def inbox_total() -> int:
        return sum([len(await p.inbox(u)) for u in users])

    async def all_stored() -> bool:
        return await inbox_total() >= want.inbox_total

    async def all_pushed() -> bool:
        got = received(p.sims)
        return all(got[u][m] >= 1 for u, ids in want.pushed.items() for m in ids)

    async def all_offline() -> bool:
        return sum(len(o.users) for o in await p.offline()) >= want.offline_total

    try:
        await eventually(all_stored, 120, f"{want.inbox_total} inbox entries")
    except AssertionError:
        for worker in p.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                print(worker.name, await asyncio.to_thread(worker.get, "/stats"))
        raise
    await eventually(all_pushed, 120, f"{want.pushed_total} pushes")
    await eventually(all_offline, 60, f"{want.offline_total} offline users")
    await p.settled()  # nothing more is on its way: a duplicate would be here

    for user in users:
        entries = await p.inbox(user)
        assert sorted(e.msg_id for e in entries) == sorted(want.inbox[user]), user
        assert [e.cursor for e in entries] == list(range(1, len(entries) + 1)), user
    got = received(p.sims)
    missing = [(u, m) for u, ids in want.pushed.items() for m in ids if not got[u][m]]
    assert missing == []
    assert set(got) <= set(want.pushed)  # nobody pushed who was not a recipient online
    extra = sum(c - 1 for counts in got.values() for c in counts.values() if c > 1)
    if not duplicates_allowed:
        assert extra == 0
    assert pushed_in_order(p.sims) or duplicates_allowed
    offline: dict[int, set[str]] = {}
    for record in await p.offline():
        offline.setdefault(record.message.msg_id, set()).update(record.users)
    assert offline == dict(want.offline)


# Three workers: partitions split unevenly (4 over 3), which two do not exercise; two
# workers run in tests/faults/test_workers.py (joining and leaving mid-load) and in the
# task tests. The 2-worker variants cost CI ~35 s for nothing those do not prove.
@pytest.mark.parametrize(("count", "how"), [(3, "together"), (3, "one after another")])
async def test_every_push_and_inbox_entry_with_several_workers(
    pipeline_factory: PipelineFactory, count: int, how: str
) -> None:
    p = pipeline_factory()
    workers = await start_workers(p, count, how)
    users, groups, online = await setup(p)
    await every_worker_sees(p, workers, len(online))
    for worker in workers:
        status, ready = await asyncio.to_thread(worker.get, "/ready")
        assert status == 200 and all(ready.values()), ready

    events = list(mixed_traffic(users, groups, EVENTS, group_ratio=0.1, seed=count))
    await p.publish(events)
    await check_exact(p, users, expected(events, groups, online))
    # The work was shared: every worker fanned out some of it.
    for worker in workers:
        _, stats = await asyncio.to_thread(worker.get, "/stats")
        assert stats["stages"]["fanout"]["assigned"], stats["stages"]


# Two workers, one joining and leaving mid-load: tests/faults/test_workers.py.
@pytest.mark.parametrize("count", [3])
async def test_a_worker_leaving_mid_load_loses_nothing(
    pipeline_factory: PipelineFactory, count: int
) -> None:
    p = pipeline_factory()
    workers = await start_workers(p, count, "together")
    users, groups, online = await setup(p)
    await every_worker_sees(p, workers, len(online))

    events = list(mixed_traffic(users, groups, 1500, group_ratio=0.1, seed=10 + count))

    async def produce() -> None:
        for start in range(0, len(events), 50):
            await p.publish(events[start : start + 50])
            await asyncio.sleep(0.1)  # ~500 events/s: the load outlasts the leave

    producing = asyncio.create_task(produce())
    await asyncio.sleep(1.0)
    leaving = workers[-1]
    await asyncio.to_thread(leaving.stop)  # SIGTERM: drain, commit, leave the groups
    assert leaving.proc is not None and leaving.proc.returncode == 0, leaving.log_tail()
    await producing
    # Pushes in flight on the leaving worker when it stopped are either acknowledged and
    # committed there, or sent again by the next owner: never lost; a repeat is allowed
    # (gateways dedupe by msg_id) and counted.
    await check_exact(p, users, expected(events, groups, online), duplicates_allowed=True)
    got = received(p.sims)
    repeats = Counter(c for counts in got.values() for c in counts.values())
    print(f"push repeats after the leave: {dict(repeats)}")


async def test_one_event_reaches_both_gateways_from_any_worker(
    pipeline_factory: PipelineFactory,
) -> None:
    """A user on two gateways (two devices) is pushed on both, whoever fans out."""
    p = pipeline_factory()
    workers = await start_workers(p, 2, "together")
    users = [p.user(i) for i in range(40)]
    await p.gateway("gw-a", users)
    await p.gateway("gw-b", users[:20])
    await every_worker_sees(p, workers, 40)

    async def both_devices_seen() -> bool:
        for worker in workers:
            for user in users[:20]:
                _, body = await asyncio.to_thread(worker.get, f"/routes/{user}")
                if len(body.get("view_gateways", ())) != 2:
                    return False
        return True

    await eventually(both_devices_seen, 30, "both devices of 20 users on every worker")
    events = [
        PushEvent(
            msg_id=1000 + i,
            seq_id=1,
            session_id=f"{p.tag}-s{i}",  # 40 sessions: spread over every partition
            from_username=users[(i + 1) % 40],
            to_username=users[i],
            content="two devices",
        )
        for i in range(40)
    ]
    await p.publish(events)

    async def pushed() -> bool:
        return sum(len(s.recorder.deliveries) for s in p.sims) >= 60

    await eventually(pushed, 60, "60 pushes")
    a, b = (Counter(r.user for r in s.recorder.deliveries) for s in p.sims)
    assert a == Counter(users) and b == Counter(users[:20])


async def test_large_group_jobs_run_and_keep_their_cursors_on_the_owning_worker(
    pipeline_factory: PipelineFactory,
) -> None:
    """Two workers, large groups on every partition: each job is run once, by the worker
    that owns its partition, which reads and writes its cursor there; nothing is lost."""
    p = pipeline_factory(large_group_min_members=50, large_group_page_size=20)
    workers = await start_workers(p, 2, "together")
    users, groups, online = await setup(p, group_count=8, spacing=15)
    await every_worker_sees(p, workers, len(online))
    # Started together, the workers may first be given every partition in turn: the jobs
    # go out once each owns some of the job topic, and has for two seconds (in CI, one
    # was ready owning none; another time one owned some when looked at, and none by the
    # time the jobs came: a rebalance in waves).
    jobs_topic = f"{p.env['APP_ID']}-large-group-jobs:"
    seen: list[tuple[float, list[frozenset[str]]]] = []

    async def both_own_jobs_for_a_while() -> bool:
        owned = []
        for worker in workers:
            _, stats = await asyncio.to_thread(worker.get, "/stats")
            owned.append(frozenset(tp for tp in stats["assignment"] if tp.startswith(jobs_topic)))
        if not all(owned) or (seen and seen[-1][1] != owned):
            seen.clear()
        seen.append((time.monotonic(), owned))
        return all(owned) and seen[-1][0] - seen[0][0] >= 2.0

    await eventually(both_own_jobs_for_a_while, 60, "large-group job partitions on both workers")

    events = list(mixed_traffic(users, groups, 200, group_ratio=0.3, seed=3))
    group_ids = {e.msg_id for e in events if e.session_id in groups}
    await p.publish(events)
    await check_exact(p, users, expected(events, groups, online))

    ran: dict[str, set[int]] = {}
    pages: dict[str, float] = {}
    for worker in workers:
        _, jobs = await asyncio.to_thread(worker.get, "/large-groups")
        _, stats = await asyncio.to_thread(worker.get, "/stats")
        assert jobs["in_progress"] == [], jobs
        ran[worker.name] = {j["msg_id"] for j in jobs["finished"]}
        pages[worker.name] = stats["counters"].get("resonance_large_group_pages_total", 0)
    print(f"jobs per worker: { {w: len(ids) for w, ids in ran.items()} }, pages: {pages}")
    # Every job finished with its cursor on exactly one worker, both workers paged
    # groups, and no job ran twice: 3 pages a job (60 members, 20 a page), no more.
    assert set().union(*ran.values()) == group_ids
    assert sum(len(ids) for ids in ran.values()) == len(group_ids)
    assert all(count > 0 for count in pages.values()), pages
    assert sum(pages.values()) == 3 * len(group_ids), pages
