"""Large groups end to end: paging, resume after kill -9, read diffusion in /inbox."""

from __future__ import annotations

import asyncio
from collections import Counter

from resonance_task.commands.traffic import group_chat
from resonance_task.embedded.expectations import received
from resonance_task.embedded.worker import WorkerProcess
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import DeliveryBatch
from tests.harness import Pipeline, PipelineFactory, eventually, inbox_msg_ids


async def online_users(worker: WorkerProcess) -> int:
    """Users the worker's routes view holds online: what its fan-out routes with."""
    _, stats = await asyncio.to_thread(worker.get, "/stats")
    return int(stats["online_users"])


async def test_group_of_20000_every_inbox_once_every_online_member_pushed_once(
    pipeline_factory: PipelineFactory,
) -> None:
    p: Pipeline = pipeline_factory(large_group_page_size=1000)
    worker = await p.start_worker()
    members = [p.user(i) for i in range(20_000)]
    group = f"{p.tag}-huge"
    await p.members.add(group, members)
    online = members[::10]  # 10% online, on two gateways
    sims = [await p.gateway("gw-l1", online[:1000]), await p.gateway("gw-l2", online[1000:])]

    async def all_routed() -> bool:
        return await online_users(worker) >= len(online)

    await eventually(all_routed, 60, "2000 routes")
    events = [group_chat(members[3], group, seq, f"to twenty thousand #{seq}") for seq in (1, 2)]
    await p.publish(events)
    msg_ids = sorted(e.msg_id for e in events)

    async def all_pushed() -> bool:
        return sum(len(s.recorder.deliveries) for s in sims) >= 2 * len(online)

    await eventually(all_pushed, 90, "pushes to every online member")
    inboxes: dict[str, list[int]] = {}

    async def all_stored() -> bool:
        nonlocal inboxes
        inboxes = await inbox_msg_ids(p.redis_url, members)
        return all(len(ids) == 2 for ids in inboxes.values())

    await eventually(all_stored, 90, "20,000 inboxes with both messages")
    await p.settled(jobs=msg_ids, worker=worker)  # a duplicate would be here by now
    inboxes = await inbox_msg_ids(p.redis_url, members)
    assert all(sorted(ids) == msg_ids for ids in inboxes.values())
    got = received(sims)
    # The sender (members[3]) is not online here, so every online member gets both, once.
    assert {u: sorted(c.elements()) for u, c in got.items()} == {u: msg_ids for u in online}
    offline = [r for r in await p.offline() if r.message.msg_id in msg_ids]
    assert sum(len(r.users) for r in offline) == 2 * (len(members) - len(online) - 1)
    _, jobs = await asyncio.to_thread(worker.get, "/large-groups")
    assert sorted(j["msg_id"] for j in jobs["finished"]) == msg_ids
    assert {j["pages"] for j in jobs["finished"]} == {20}


async def test_worker_killed_mid_group_resumes_from_its_cursor(
    pipeline_factory: PipelineFactory,
) -> None:
    # 100 pages at 10 a second: the kill lands mid-group. One page in flight (the default).
    p: Pipeline = pipeline_factory(large_group_page_size=100, large_group_pages_per_second=10)
    first = await p.start_worker("worker-1")
    members = [p.user(i) for i in range(10_000)]
    group = f"{p.tag}-resume"
    await p.members.add(group, members)
    event = group_chat(members[0], group, 1, "survives a kill")
    await p.publish([event])

    async def pages_done() -> int:
        _, jobs = await asyncio.to_thread(first.get, "/large-groups")
        return max((j["pages"] for j in jobs["in_progress"]), default=0)

    async def past_page_20() -> bool:
        return await pages_done() >= 20

    await eventually(past_page_20, 60, "20 pages")
    await asyncio.to_thread(first.kill)
    second = await p.start_worker("worker-2")

    async def finished() -> bool:
        _, jobs = await asyncio.to_thread(second.get, "/large-groups")
        return any(j["msg_id"] == event.msg_id for j in jobs["finished"])

    try:
        await eventually(finished, 90, "the job to finish on the second worker")
    except AssertionError as exc:
        # Seen rarely in CI: the successor never ran the job. What it held says why.
        _, held = await asyncio.to_thread(second.get, "/stats")
        _, jobs = await asyncio.to_thread(second.get, "/large-groups")
        raise AssertionError(f"{exc}; second worker: {held['assignment']}, {jobs}") from None
    records: Counter[int] = Counter()  # page -> deliveries of it
    users: Counter[str] = Counter()
    for r in await p.read_topic(p.topic("APP_ID") + "-deliveries"):
        for delivery in DeliveryBatch.FromString(r.value).deliveries:
            if delivery.message.msg_id == event.msg_id:
                records[delivery.page] += 1
                users.update(delivery.users)
    assert sorted(records) == list(range(100))
    redone = [page for page, sent in records.items() if sent > 1]
    # Only the page in flight at the kill was sent twice, never the pages before it.
    assert len(redone) <= 1 and all(page >= 20 for page in redone), redone
    assert set(users) == set(members)
    _, stats = await asyncio.to_thread(second.get, "/stats")
    assert stats["counters"]["resonance_large_group_resumed_total"] == 1

    async def all_stored() -> bool:
        inboxes = await inbox_msg_ids(p.redis_url, members)
        return all(ids == [event.msg_id] for ids in inboxes.values())

    await eventually(all_stored, 60, "every inbox once")


async def test_read_diffusion_group_is_one_timeline_merged_into_inbox_sync(
    pipeline_factory: PipelineFactory,
) -> None:
    p: Pipeline = pipeline_factory(large_group_min_members=100, read_diffusion_min_members=300)
    worker = await p.start_worker()
    members = [p.user(i) for i in range(400)]
    group = f"{p.tag}-channel"
    first_at = 1_700_000_000_000
    await p.members.add(group, members, joined_at_ms=first_at - 1000)
    online = members[:40]
    sim = await p.gateway("gw-rd", online)
    await p.wait_routable(worker, len(online))
    late = p.user(999)
    await p.members.add(group, [late], joined_at_ms=first_at + 500)
    events = [group_chat(members[1], group, seq, f"announcement {seq}") for seq in (1, 2)]
    events[0].timestamp, events[1].timestamp = first_at, first_at + 1000
    await p.publish(events)
    msg_ids = [e.msg_id for e in events]

    async def pushed() -> bool:
        return len(sim.recorder.deliveries) >= 2 * 39

    await eventually(pushed, 60, "pushes to the online members")
    status, body = await asyncio.to_thread(worker.get, f"/inbox/{members[200]}")
    assert status == 200 and body["entries"] == []  # no per-member inbox copy
    ((timeline,),) = [body["timelines"]]
    assert timeline["session_id"] == group
    assert [e["msg_id"] for e in timeline["entries"]] == msg_ids
    assert [e["cursor"] for e in timeline["entries"]] == [1, 2] and timeline["next"] == 2
    assert timeline["entries"][0]["message"]["content"] == "announcement 1"
    # Synced up to cursor 1 already: only the second message comes back.
    _, body = await asyncio.to_thread(worker.get, f"/inbox/{members[5]}?timelines={group}:1")
    assert [e["msg_id"] for e in body["timelines"][0]["entries"]] == msg_ids[1:]
    # A member who joined after the first message sees only the second.
    _, body = await asyncio.to_thread(worker.get, f"/inbox/{late}")
    assert [e["msg_id"] for e in body["timelines"][0]["entries"]] == msg_ids[1:]
    status, body = await asyncio.to_thread(worker.get, f"/inbox/{late}?timelines=nocolon")
    assert status == 400 and "timelines" in body["error"]

    await p.settled(jobs=msg_ids, worker=worker)
    got = received([sim])
    assert {u: sorted(c.elements()) for u, c in got.items()} == {
        u: sorted(msg_ids) for u in online if u != members[1]
    }
    assert [o for o in await p.offline() if o.message.msg_id in msg_ids] == []
    assert all(ids == [] for ids in (await inbox_msg_ids(p.redis_url, members)).values())
