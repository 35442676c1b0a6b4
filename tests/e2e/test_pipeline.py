"""The whole pipeline, end to end: exact counts, order, offline, DLQ, replay, payload once."""

from __future__ import annotations

import asyncio
import random
import re
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from resonance_task.commands.traffic import group_chat, single_chat, snowflake
from resonance_task.embedded.expectations import Expected, expected, pushed_in_order, received
from resonance_task.embedded.worker import ROOT, WorkerProcess
from resonance_task.pipeline.dlq import H_REASON
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import DeliveryBatch, GatewayPushBatch
from tests.harness import Pipeline, PipelineFactory, eventually


def traffic(p: Pipeline, users: list[str], group: str) -> list[PushEvent]:
    rng = random.Random(3)
    seqs: Counter[str] = Counter()
    events: list[PushEvent] = []
    for i in range(150):
        sender, recipient = rng.sample(users, 2)
        event = single_chat(sender, recipient, 0, f"hi {i}")
        seqs[event.session_id] += 1
        event.seq_id = seqs[event.session_id]
        events.append(event)
        if i % 8 == 0:
            seqs[group] += 1
            events.append(group_chat(rng.choice(users[:50]), group, seqs[group], f"group {i}"))
    explicit = f"{p.tag}-explicit"
    for i in range(1, 11):
        events.append(
            PushEvent(
                msg_id=snowflake(),
                seq_id=i,
                session_id=explicit,
                from_username=users[0],
                to_usernames=[users[5], users[25], users[45], users[55]],
                exclude_usernames=[users[25]],
                session_type=2,
                content=f"explicit {i}",
            )
        )
    typing = single_chat(users[1], users[2], 1, "typing...")
    typing.session_id += ":typing"
    typing.push_only = True
    notice = single_chat(users[3], users[4], 1, "stored only")
    notice.session_id += ":notice"
    notice.persist_only = True
    return [*events, typing, notice]


async def test_every_recipient_once_in_order_with_offline_dlq_and_replay(
    pipeline: Pipeline, pipeline_factory: PipelineFactory
) -> None:
    p = pipeline
    worker = await p.start_worker()
    users = [p.user(i) for i in range(60)]
    group = f"{p.tag}-group"
    await p.members.add(group, users[:50])
    sims = [await p.gateway("gw-a", users[:20]), await p.gateway("gw-b", users[20:40])]
    await p.wait_online(worker, users[:40])

    events = traffic(p, users, group)
    bad = [b"\xff\xfe not a protobuf", PushEvent(session_id="no-msg-id").SerializeToString()]
    await p.publish([*events[:50], *bad, *events[50:]])
    want = expected(events, {group: users[:50]}, set(users[:40]))

    async def inbox_total() -> int:
        return sum([len(await p.inbox(u)) for u in users])

    async def inboxes_full() -> bool:
        return await inbox_total() >= want.inbox_total

    await eventually(inboxes_full, 90, f"{want.inbox_total} inbox entries")
    await eventually(
        lambda: _true(sum(len(s.recorder.deliveries) for s in sims) >= want.pushed_total),
        60,
        f"{want.pushed_total} pushes",
    )
    await p.settled()  # nothing more is on its way: a duplicate would be here

    # Inbox: every recipient once, cursors 1..n, and each conversation in seq_id order.
    for user in users:
        entries = await p.inbox(user)
        assert sorted(e.msg_id for e in entries) == sorted(want.inbox[user]), user
        assert [e.cursor for e in entries] == list(range(1, len(entries) + 1)), user
        by_session: dict[str, list[int]] = {}
        for e in entries:
            assert e.message is not None
            by_session.setdefault(e.message.session_id, []).append(e.message.seq_id)
        assert all(seqs == sorted(seqs) for seqs in by_session.values()), user

    # Push: every online recipient once, never the sender, in order per conversation.
    got = received(sims)
    for user in users:
        assert got.get(user, Counter()) == Counter(want.pushed[user]), user
    assert pushed_in_order(sims)

    # Offline: exactly the recipients who were not online.
    async def offline_complete() -> bool:
        return sum(len(o.users) for o in await p.offline()) >= want.offline_total

    await eventually(offline_complete, 30, "offline pushes")
    offline: dict[int, set[str]] = {}
    for record in await p.offline():
        assert record.reason == "not_online"
        offline.setdefault(record.message.msg_id, set()).update(record.users)
    assert offline == dict(want.offline)

    # Bad input: both records dead-lettered with their reason; everything after them flowed.
    dead = await p.read_topic(p.topic("TOPIC_PUSH_EVENTS") + ".dlq")
    assert sorted(dict(r.headers)[H_REASON] for r in dead) == [b"decode_error", b"invalid"]
    assert sorted(r.value for r in dead) == sorted(bad)

    await _scrape_finds_every_documented_metric(worker, len(events), want)

    # Replay from the beginning: a new consumer group reads every record again.
    snapshot = {u: [(e.cursor, e.msg_id) for e in await p.inbox(u)] for u in users}
    await asyncio.to_thread(worker.stop)
    replayer = await pipeline_factory().start_worker("replay", app_id=f"rt-{p.tag}-replay")

    async def replayed() -> bool:
        _, stats = await asyncio.to_thread(replayer.get, "/stats")
        return int(stats["storage"]["duplicates"]) >= want.inbox_total

    await eventually(replayed, 90, "the replay to reach the inbox store")
    _, stats = await asyncio.to_thread(replayer.get, "/stats")
    assert stats["storage"]["new"] == 0
    assert {u: [(e.cursor, e.msg_id) for e in await p.inbox(u)] for u in users} == snapshot


async def test_group_of_1000_sends_the_body_once_per_record_and_batch(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    worker = await p.start_worker()
    members = [p.user(i) for i in range(1000)]
    group = f"{p.tag}-big"
    await p.members.add(group, members)
    sim = await p.gateway("gw-big", members[:500])
    await p.wait_routable(worker, 500)
    event = group_chat(members[0], group, 1, "to a thousand")
    await p.publish([event])

    await eventually(lambda: _true(len(sim.recorder.deliveries) >= 499), 30, "499 pushes")
    deliveries = [
        d
        for r in await p.read_topic(f"rt-{p.tag}-deliveries")
        for d in DeliveryBatch.FromString(r.value).deliveries
    ]
    # The inbox side: the body once for all thousand members.
    assert [(d.message.msg_id, len(d.users)) for d in deliveries] == [(event.msg_id, 1000)]
    pushes = [
        push
        for r in await p.read_topic(f"rt-{p.tag}-gateway-pushes")
        for push in GatewayPushBatch.FromString(r.value).pushes
    ]
    assert [(push.message.msg_id, len(push.users)) for push in pushes] == [(event.msg_id, 499)]
    # The gateway got the body once per call that carried it, never once per user.
    assert all(len(call) == len(set(call)) for call in sim.recorder.calls)
    assert sim.recorder.bodies <= 4  # one per PushBatch: 499 users in batches of 128
    assert Counter(r.user for r in sim.recorder.deliveries) == Counter(members[1:500])


async def test_gateway_with_only_unary_push_gets_every_delivery(pipeline: Pipeline) -> None:
    p = pipeline
    worker = await p.start_worker()
    users = [p.user(i) for i in range(20)]
    sim = await p.gateway("gw-legacy", users, stream=False)
    await p.wait_online(worker, users)
    events = [
        single_chat(users[i % 20], users[(i + 1) % 20], 1 + i // 20, f"m{i}") for i in range(100)
    ]
    await p.publish(events)
    await eventually(lambda: _true(len(sim.recorder.deliveries) >= 100), 30, "100 unary pushes")
    await p.settled()
    assert sim.recorder.batches == 0 and sim.recorder.unary_calls >= 1
    assert Counter(r.msg_id for r in sim.recorder.deliveries) == Counter(e.msg_id for e in events)


async def _true(value: bool) -> bool:
    return value


async def test_tables_in_rocksdb_survive_a_restart_on_the_same_data_dir(
    pipeline_factory: PipelineFactory,
) -> None:
    p = pipeline_factory(table_store="rocksdb")
    worker = await p.start_worker("rocks")
    users = [p.user(i) for i in range(10)]
    sim = await p.gateway("gw-rocks", users)
    await p.wait_online(worker, users)
    await p.publish([single_chat(users[0], u, 1, "before") for u in users[1:]])
    await eventually(lambda: _true(len(sim.recorder.deliveries) >= 9), 30, "9 pushes")
    await asyncio.to_thread(worker.stop)
    assert any((p.workdir / "rocks-data").rglob("*.sst")) or any(
        (p.workdir / "rocks-data").rglob("CURRENT")
    ), "the table store wrote nothing to DATA_DIR"
    again = await p.start_worker("rocks")  # same name: same DATA_DIR
    await p.wait_online(again, users)
    await p.publish([single_chat(users[0], u, 2, "after") for u in users[1:]])
    await eventually(lambda: _true(len(sim.recorder.deliveries) >= 18), 30, "9 more pushes")


async def _scrape_finds_every_documented_metric(
    worker: WorkerProcess, events: int, want: Expected
) -> None:
    """/metrics after that traffic: every metric README.md's table lists (offline push
    providers' once one is configured: none here), with values the traffic explains."""
    url = f"http://127.0.0.1:{worker.port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `((?:resonance|task)_[a-z_]+)` \|", readme, re.MULTILINE))
    documented = {name for name in documented if not name.startswith("resonance_offline_")}
    missing = {
        n for n in documented if n not in families and n.removesuffix("_total") not in families
    }
    assert missing == set(), missing

    def total(name: str, **labels: str) -> float:
        return sum(
            value
            for have, value in samples.get(name, [])
            if all(have.get(k) == v for k, v in labels.items())
        )

    assert total("resonance_push_events_total") >= events
    assert total("resonance_inbox_writes_total", result="new") >= want.inbox_total
    assert total("resonance_pushed_users_total") >= want.pushed_total
    assert total("resonance_offline_users_total") >= want.offline_total
    assert total("resonance_dead_letters_total", reason="decode_error") >= 1
    assert total("resonance_commit_duration_seconds_count") > 0
    assert all(v >= 0 for _, v in samples.get("resonance_consumer_lag", []))
    rebalanced = {labels["stage"] for labels, v in samples["resonance_stage_rebalances_total"] if v}
    assert {"fanout", "storage", "push"} <= rebalanced, rebalanced
    assert total("resonance_faust_messages_received_total") > 0  # heartbeats, into registry
    assert total("resonance_presence_changes_total", result="applied") > 0
    assert total("resonance_view_delay_seconds_count", view="routes") > 0
    assert total("resonance_message_age_seconds_count", stage="gateway_ack") > 0
