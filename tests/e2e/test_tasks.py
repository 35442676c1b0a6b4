"""Typed tasks end to end: a real worker, the embedded broker, Redis, the REST API.

The single-worker tests share one worker (module scope): each uses task ids of its own,
and what it reads of a shared topic it picks out by those ids. A worker start is seconds
of CI; the tests that need a worker to themselves (two workers) start their own."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.worker import ROOT, WorkerProcess
from resonance_task.pipeline.dlq import dlq_topic
from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task
from tests.harness import Pipeline, PipelineFactory, eventually

pytestmark = pytest.mark.slow

TASK_ENV = {
    "tasks_enabled": True,
    "task_processor_modules": "tests.tasks.processors",
    "task_retry_delays_ms": "200,400",
}


async def _publish(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


class Moderation(BaseHTTPRequestHandler):
    """A moderation service: "spam" is blocked; content "busy" is answered 503 once."""

    asked: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Moderation.asked.append(body)
        if body["content"] == "busy" and sum(a["content"] == "busy" for a in self.asked) == 1:
            self._answer(503, {"error": "busy"})
        else:
            self._answer(200, {"verdict": "block" if "spam" in body["content"] else "pass"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def moderation() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Moderation)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/moderate"
    server.shutdown()


@pytest.fixture(scope="module")
def shared(
    broker: EmbeddedBroker,
    redis_url: str,
    moderation: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Pipeline, WorkerProcess]]:
    workdir = tmp_path_factory.mktemp("tasks")
    # 20 slots: the priority test saturates them with a low-priority backlog.
    tag = "t" + uuid.uuid4().hex[:8]
    team_topic = f"{tag}.team.audit-requests"
    # A team's own topic, read as tasks of a type: it exists before the worker subscribes.
    asyncio.run(_publish(broker.bootstrap, team_topic, [b'{"n": 0}']))
    p = Pipeline(
        tag,
        broker,
        redis_url,
        workdir,
        {
            **TASK_ENV,
            "task_concurrency": 20,
            "task_audit_url": moderation,
            "task_topic_routes": f"{team_topic}=counted",
        },
    )
    worker = WorkerProcess(p.env, workdir, "worker").start()
    try:
        worker.wait_ready()
        yield p, worker
    finally:
        worker.kill()


def _submit(worker: WorkerProcess, **task: Any) -> dict[str, Any]:
    status, body = worker.request("POST", "/api/v1/tasks", task)
    assert status in (200, 201), (status, body)
    return body  # type: ignore[no-any-return]


async def _state(
    worker: WorkerProcess, task_id: str, want: str, seconds: float = 30, published: bool = False
) -> dict[str, Any]:
    """Wait for a task's state; `published` tasks are unknown (404) until intake reads them."""
    seen: list[str] = []

    async def reached() -> bool:
        status, body = worker.get(f"/api/v1/tasks/{task_id}")
        if status == 404 and published:
            return False
        assert status == 200, body
        if not seen or seen[-1] != body["state"]:
            seen.append(body["state"])
        return bool(body["state"] == want)

    # Often: a retrying state lasts one retry delay (200 ms here).
    await eventually(reached, seconds, f"{task_id} {want}", interval=0.05)
    _, body = worker.get(f"/api/v1/tasks/{task_id}")
    body["seen"] = seen
    return body  # type: ignore[no-any-return]


async def _letters(p: Pipeline, keys: set[bytes]) -> list[Any]:
    """The task DLQ's records of these keys (task ids): the topic is the module's."""
    return [r for r in await p.read_topic(dlq_topic(p.env["TOPIC_TASKS"])) if r.key in keys]


async def _command(p: Pipeline, *args: str) -> dict[str, Any]:
    """`faust -A resonance_task.app <args>` as an operator runs it; its last line of output,
    as JSON."""
    env = {**os.environ, **p.env, "PYTHONPATH": str(ROOT)}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "faust", "-A", "resonance_task.app", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


async def _ran(p: Pipeline, task_id: str, times: int) -> bool:
    return await _runs(p, task_id) == times


async def _runs(p: Pipeline, task_id: str) -> int:
    r = aioredis.from_url(p.env["REDIS_URL"], decode_responses=True)
    try:
        return int(await r.get(f"test-task-runs:{p.env['APP_ID']}:{task_id}") or 0)
    finally:
        await r.aclose()


async def test_a_task_failing_twice_retries_then_succeeds(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    p, worker = shared
    _submit(worker, task_id="flaky-1", task_type="flaky", payload={"fail_times": 2})
    done = await _state(worker, "flaky-1", "succeeded")
    assert "retrying" in done["seen"], done
    assert done["attempt"] == 2 and done["result"] == {"runs": 3}, done
    assert done["progress"] == 100
    assert await _runs(p, "flaky-1") == 3


async def test_exhausted_and_permanent_failures_are_dead_lettered_and_replayable(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    p, worker = shared
    _submit(worker, task_id="always-1", task_type="always_fails", max_attempts=3)
    _submit(worker, task_id="refused-1", task_type="refuses", max_attempts=5)
    dead = await _state(worker, "always-1", "dead")
    assert dead["attempt"] == 3 and "it always fails" in dead["error"], dead
    refused = await _state(worker, "refused-1", "dead")
    # A permanent error is not retried: one run, straight to the dead letters.
    assert refused["attempt"] == 1 and "can never work" in refused["error"], refused
    assert await _runs(p, "always-1") == 3 and await _runs(p, "refused-1") == 1

    letters = await _letters(p, {b"always-1", b"refused-1"})
    by_id = {Task.FromString(r.value).task_id: r for r in letters}
    assert set(by_id) == {"always-1", "refused-1"} and len(letters) == 2
    headers = {k: v.decode() for k, v in by_id["always-1"].headers}
    assert headers["dlq.reason"] == "attempts_exhausted"
    assert headers["task.attempts"] == "3" and headers["task.exception"] == "RuntimeError"
    # Where it was first read: submitted through the API, its priority's lane.
    assert headers["dlq.topic"] == f"{p.env['APP_ID']}-tasks-normal"
    assert headers["dlq.offset"].isdigit() and headers["dlq.partition"].isdigit()
    assert {k: v.decode() for k, v in by_id["refused-1"].headers}["dlq.reason"] == (
        "permanent_error"
    )

    # Replay runs it again from its first attempt; a second replay finds nothing dead.
    status, body = worker.request("POST", "/api/v1/tasks/dlq/replay", {"task_ids": ["always-1"]})
    assert status == 200 and body["replayed"] == ["always-1"], body
    status, body = worker.request("POST", "/api/v1/tasks/dlq/replay", {"task_ids": ["always-1"]})
    assert body["replayed"] == [], body
    await _state(worker, "always-1", "dead")
    assert await _runs(p, "always-1") == 6

    # The same from the command line, reading the DLQ: a dry run sends nothing.
    dry = await _command(p, "task-dlq-replay", "--task-id", "refused-1", "--dry-run")
    assert dry["would_replay"] == ["refused-1"] and dry["replayed"] == 1, dry
    assert (await _state(worker, "refused-1", "dead"))["attempt"] == 1
    done = await _command(
        p, "task-dlq-replay", "--task-id", "refused-1", "--reason", "permanent_error"
    )
    assert done["replayed"] == 1, done
    await eventually(lambda: _ran(p, "refused-1", 2), 30, "refused-1 run again")
    await _state(worker, "refused-1", "dead")


async def test_a_task_past_its_timeout_is_stopped_and_the_others_run_on(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    _, worker = shared
    _submit(
        worker,
        task_id="hangs-1",
        task_type="sleeps",
        payload={"ms": 60_000},
        timeout_ms=300,
        max_attempts=1,
    )
    _submit(worker, task_id="beside-hangs-1", task_type="sleeps", payload={"ms": 1})
    await _state(worker, "beside-hangs-1", "succeeded")
    dead = await _state(worker, "hangs-1", "dead")
    assert dead["error"] == "timed out after 0.3s", dead
    assert dead["finished_at"] - dead["started_at"] < 10_000, dead


async def test_cancel_a_queued_and_a_running_task(shared: tuple[Pipeline, WorkerProcess]) -> None:
    p, worker = shared
    _submit(worker, task_id="slow-1", task_type="slow", payload={"seconds": 30})
    # Not before an hour from now: queued meanwhile, in a retry topic.
    later = int(time.time() * 1000) + 3_600_000
    _submit(worker, task_id="later-1", task_type="counted", not_before=str(later))
    await _state(worker, "slow-1", "running")

    async def progressing() -> bool:
        return bool(worker.get("/api/v1/tasks/slow-1")[1]["progress"] > 0)

    await eventually(progressing, 10, "progress reported")
    status, body = worker.request("DELETE", "/api/v1/tasks/later-1")
    assert status == 200 and body["state"] == "cancelled", body
    status, body = worker.request("DELETE", "/api/v1/tasks/slow-1")
    assert status == 202 and body["cancel_requested"] is True, body
    cancelled = await _state(worker, "slow-1", "cancelled", seconds=10)
    assert 0 < cancelled["progress"] < 100, cancelled
    assert await _runs(p, "slow-1") == 1 and await _runs(p, "later-1") == 0
    status, body = worker.request("DELETE", "/api/v1/tasks/slow-1")
    assert status == 409, body
    # A cancelled task may be asked to run again.
    status, body = worker.request("POST", "/api/v1/tasks/later-1/retry")
    assert status == 202, body
    await _state(worker, "later-1", "succeeded")


async def test_a_duplicate_idempotency_key_runs_once(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    p, worker = shared
    first = _submit(worker, task_id="idem-1", task_type="counted", idempotency_key="order-42")
    second = _submit(worker, task_id="idem-2", task_type="counted", idempotency_key="order-42")
    assert first["state"] == "queued" and second["duplicate_of"] == "idem-1", second
    await _state(worker, "idem-1", "succeeded")
    assert (await _state(worker, "idem-2", "cancelled"))["error"] == "duplicate of idem-1"
    assert await _runs(p, "idem-1") == 1 and await _runs(p, "idem-2") == 0


async def test_tasks_published_to_the_topic_run_and_bad_ones_are_dead_lettered(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    from aiokafka import AIOKafkaProducer

    p, worker = shared
    producer = AIOKafkaProducer(bootstrap_servers=p.broker.bootstrap)
    await producer.start()
    topic = p.env["TOPIC_TASKS"]
    try:
        proto = Task(task_id="from-proto", task_type="counted")
        await producer.send_and_wait(topic, proto.SerializeToString(), key=b"from-proto")
        as_json = json.dumps({"task_type": "counted", "priority": "high"}).encode()
        await producer.send_and_wait(topic, as_json, key=b"from-json")
        unknown = json.dumps({"task_id": "nope", "task_type": "no_such_type"}).encode()
        await producer.send_and_wait(topic, unknown, key=b"nope")
        await producer.send_and_wait(topic, b"\xff\x00garbage", key=b"junk")
        # Its envelope is fine, its payload is not: dead at once, never run or retried.
        typed = Task(task_id="typed-bad", task_type="typed", payload=b'{"n": 0}')
        await producer.send_and_wait(topic, typed.SerializeToString(), key=b"typed-bad")
        typed_json = {"task_id": "typed-json-bad", "task_type": "typed", "payload": {"m": 1}}
        await producer.send_and_wait(topic, json.dumps(typed_json).encode(), key=b"typed-json-bad")
        good = {"task_id": "typed-good", "task_type": "typed", "payload": {"n": 3}}
        await producer.send_and_wait(topic, json.dumps(good).encode(), key=b"typed-good")
    finally:
        await producer.stop()
    await _state(worker, "from-proto", "succeeded", published=True)
    await _state(worker, "from-json", "succeeded", published=True)  # the record key is its task_id
    # A slot was idle and nothing waited: the intake started them itself, no lane hop.
    lanes = [f"{p.env['APP_ID']}-tasks-{lane}" for lane in ("high", "normal", "low")]
    laned = [r.key for lane in lanes for r in await p.read_topic(lane)]
    assert b"from-proto" not in laned and b"from-json" not in laned, laned
    status, _ = worker.get("/api/v1/tasks/nope")
    assert status == 404

    async def both_dead_lettered() -> bool:
        return len(await _letters(p, {b"nope", b"junk"})) >= 2

    await eventually(both_dead_lettered, 30, "two dead letters")
    reasons = sorted(
        dict(r.headers)["dlq.reason"].decode() for r in await _letters(p, {b"nope", b"junk"})
    )
    assert reasons == ["decode_error", "unknown_task_type"], reasons

    ok = await _state(worker, "typed-good", "succeeded", published=True)
    assert ok["result"] == {"n": 3, "label": "plain"}, ok  # the model, default filled in
    assert ok["payload"] == {"n": 3, "label": "plain"}, ok  # and stored so
    for task_id, field in [("typed-bad", "payload.n"), ("typed-json-bad", "payload.n")]:
        dead = await _state(worker, task_id, "dead", published=True)
        assert dead["error"].startswith(f"{field}: "), dead
        assert set(dead["seen"]) <= {"queued", "dead"} and dead["attempt"] == 0, dead
    await asyncio.sleep(1)  # a retry would be due by now (TASK_RETRY_DELAYS_MS 200,400)
    assert await _runs(p, "typed-bad") == 0 and await _runs(p, "typed-json-bad") == 0
    assert (await _state(worker, "typed-bad", "dead"))["attempt"] == 0

    async def typed_dead_lettered() -> bool:
        return len(await _letters(p, {b"typed-bad", b"typed-json-bad"})) >= 2

    await eventually(typed_dead_lettered, 30, "the typed tasks' dead letters")
    letters = await _letters(p, {b"typed-bad", b"typed-json-bad"})
    assert len(letters) == 2, letters  # once each: no retry wrote another
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        assert headers["dlq.reason"] == "invalid_payload", headers
        assert headers["dlq.error"].startswith("payload.n: "), headers
        assert headers["task.attempts"] == "0", headers


async def test_bad_requests_name_the_field(shared: tuple[Pipeline, WorkerProcess]) -> None:
    _, worker = shared
    for body, field in [
        ({"task_type": "no_such_type"}, "task_type"),
        ({"task_type": "counted", "priority": "urgent"}, "priority"),
        ({"task_type": "counted", "max_attempts": -1}, "max_attempts"),
        ({"task_type": "counted", "no_such_field": 1}, "no_such_field"),
        (["not", "an", "object"], "body"),
    ]:
        status, answer = worker.request("POST", "/api/v1/tasks", body)
        assert 400 <= status < 500 and answer["field"] == field, (body, status, answer)
    status, answer = worker.get("/api/v1/tasks/never-submitted")
    assert status == 404 and answer["field"] == "task_id"
    status, answer = worker.get("/api/v1/tasks?status=sleeping")
    assert status == 400 and answer["field"] == "status"


async def test_two_workers_share_the_tasks_and_one_leaving_loses_none(
    pipeline_factory: PipelineFactory,
) -> None:
    """Scaled by workers: both run tasks, either answers for any task, and a worker that
    leaves mid-load (SIGTERM) leaves its waiting tasks queued for the other, not leased."""
    # More work than the leaving worker can finish within its drain deadline (5 s).
    p = pipeline_factory(**TASK_ENV, task_concurrency=2)
    first, second = await asyncio.gather(p.start_worker("worker-a"), p.start_worker("worker-b"))
    ids = [f"two-{i}" for i in range(40)]
    for i, task_id in enumerate(ids):
        # Half through each worker's API: the task goes to its lane either way.
        via = first if i % 2 else second
        _submit(via, task_id=task_id, task_type="slow", payload={"seconds": 1})
    await asyncio.sleep(1.0)
    await asyncio.to_thread(second.stop)

    async def all_done() -> bool:
        _, body = first.get("/api/v1/tasks?status=succeeded&limit=1000")
        return bool(body["count"] == len(ids))

    await eventually(all_done, 60, f"{len(ids)} tasks succeeded")
    statuses = [first.get(f"/api/v1/tasks/{task_id}")[1] for task_id in ids]
    assert {s["state"] for s in statuses} == {"succeeded"}
    assert len({s["worker"] for s in statuses}) == 2, "both workers ran tasks"
    assert [await _runs(p, task_id) for task_id in ids] == [1] * len(ids)


async def test_a_status_key_of_the_wrong_type_dead_letters_its_task_alone(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    """Another hand wrote the key (a string where a hash goes): that task's record goes to
    the DLQ once its batch has failed a few times, and the tasks around it run."""
    from aiokafka import AIOKafkaProducer

    p, worker = shared
    r = aioredis.from_url(p.env["REDIS_URL"])
    await r.set(f"{p.env['APP_ID']}:{{tasks}}:task:clobbered", "not a hash")
    await r.aclose()
    producer = AIOKafkaProducer(bootstrap_servers=p.broker.bootstrap)
    await producer.start()
    topic = p.env["TOPIC_TASKS"]
    try:
        for task_id in ("before", "clobbered", "after"):
            task = Task(task_id=task_id, task_type="counted")
            await producer.send_and_wait(topic, task.SerializeToString(), key=task_id.encode())
    finally:
        await producer.stop()
    await _state(worker, "before", "succeeded", seconds=60, published=True)
    await _state(worker, "after", "succeeded", seconds=60, published=True)

    async def dead_lettered() -> bool:
        return bool(await _letters(p, {b"clobbered"}))

    await eventually(dead_lettered, 60, "the clobbered task dead-lettered")
    (letter,) = await _letters(p, {b"clobbered"})
    assert "WRONGTYPE" in dict(letter.headers)["dlq.error"].decode()
    assert await _runs(p, "clobbered") == 0


async def test_high_priority_tasks_overtake_a_low_priority_backlog(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    """10,000 low-priority tasks queued (published to the task topic, as a team's service
    would), then 100 high-priority ones through the API: the high ones finish long before
    the backlog does, and low ones keep finishing meanwhile (no starvation)."""
    from aiokafka import AIOKafkaProducer

    p, worker = shared
    lows = [f"low-{i}" for i in range(10_000)]
    highs = [f"high-{i}" for i in range(100)]
    producer = AIOKafkaProducer(bootstrap_servers=p.broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        for task_id in lows:
            task = Task(
                task_id=task_id,
                task_type="sleeps",
                payload=b'{"ms": 5}',
                priority=Priority.PRIORITY_LOW,
            )
            await producer.send(
                p.env["TOPIC_TASKS"], task.SerializeToString(), key=task_id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()

    async def backlog_running() -> bool:
        _, body = worker.get("/api/v1/tasks?status=succeeded&task_type=sleeps&limit=1000")
        return bool(body["count"] >= 200)

    await eventually(backlog_running, 60, "the low-priority backlog to be running")
    tasks = [
        {"task_id": t, "task_type": "sleeps", "payload": {"ms": 5}, "priority": "high"}
        for t in highs
    ]
    status, body = worker.request("POST", "/api/v1/tasks/batch", {"tasks": tasks})
    assert status == 200 and {r["state"] for r in body["results"]} == {"queued"}, body

    r = aioredis.from_url(p.env["REDIS_URL"], decode_responses=True)
    prefix = f"{p.env['APP_ID']}:{{tasks}}:task:"

    async def times(ids: list[str]) -> list[tuple[str, int, int]]:
        async with r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(prefix + task_id, "state", "created_at", "finished_at")
            return [(s, int(c or 0), int(f or 0)) for s, c, f in await pipe.execute()]

    async def all_succeeded() -> bool:
        return all(state == "succeeded" for state, _, _ in await times(highs + lows))

    try:
        await eventually(all_succeeded, 120, "every task to succeed")
        high, low = await times(highs), await times(lows)
    finally:
        await r.aclose()

    def p99(rows: list[tuple[str, int, int]]) -> int:
        latencies = sorted(finished - created for _, created, finished in rows)
        return latencies[int(len(latencies) * 0.99) - 1]

    high_p99, low_p99 = p99(high), p99(low)
    last_high = max(finished for _, _, finished in high)
    first_high = min(created for _, created, _ in high)
    lows_after = sum(1 for _, _, finished in low if finished > last_high)
    lows_during = sum(1 for _, _, finished in low if first_high <= finished <= last_high)
    print(f"high p99 {high_p99} ms, low p99 {low_p99} ms, lows after the last high {lows_after}")
    assert high_p99 * 5 < low_p99, (high_p99, low_p99)
    assert lows_after >= 1000, "the high tasks waited behind the low backlog"
    assert lows_during > 0, "low starved while high ran"


async def test_content_audit_asks_the_moderation_service_and_publishes_the_verdict(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    p, worker = shared
    for task_id, content in [
        ("audit-ok", "hello"),
        ("audit-spam", "buy spam"),
        ("audit-busy", "busy"),
    ]:
        _submit(
            worker,
            task_id=task_id,
            task_type="content_audit",
            payload={"content_id": f"c-{task_id}", "content": content, "sender": "u1"},
        )
    # A payload the processor could never use: refused at submit, naming the field.
    status, refused = worker.request(
        "POST",
        "/api/v1/tasks",
        {"task_id": "audit-bad", "task_type": "content_audit", "payload": {"content_id": "c-bad"}},
    )
    assert status == 400 and refused["field"] == "payload.content", (status, refused)
    assert worker.get("/api/v1/tasks/audit-bad")[0] == 404  # never submitted
    ok = await _state(worker, "audit-ok", "succeeded")
    assert ok["result"] == {"content_id": "c-audit-ok", "verdict": "pass"}, ok
    spam = await _state(worker, "audit-spam", "succeeded")
    assert spam["result"]["verdict"] == "block", spam
    busy = await _state(worker, "audit-busy", "succeeded")
    # A 503 is asked again: a second run (its retrying state may pass between two polls).
    assert busy["attempt"] == 1, busy
    assert sum(a["content"] == "busy" for a in Moderation.asked) == 2

    verdicts = {
        r.key.decode(): json.loads(r.value)
        for r in await p.read_topic(p.env["TOPIC_AUDIT_VERDICTS"])
    }
    assert {k: v["verdict"] for k, v in verdicts.items()} == {
        "c-audit-ok": "pass",
        "c-audit-spam": "block",
        "c-audit-busy": "pass",
    }
    assert verdicts["c-audit-spam"]["task_id"] == "audit-spam"
    # The payload's other fields reach the service as they were given.
    assert {a.get("sender") for a in Moderation.asked} == {"u1"}


async def test_a_teams_own_topic_is_read_as_tasks_of_its_routed_type(
    shared: tuple[Pipeline, WorkerProcess],
) -> None:
    """TASK_TOPIC_ROUTES: each record of the team's topic is one task (the record's value
    its payload, its topic:partition:offset its id), run once."""
    p, worker = shared
    topic = p.env["TASK_TOPIC_ROUTES"].split("=")[0]
    await _publish(p.broker.bootstrap, topic, [b'{"n": 1}', b'{"n": 2}'])
    routed: list[str] = []

    async def all_ran() -> bool:
        nonlocal routed
        # Through the list API's type filter: the first record ran at the worker's start,
        # behind the priority test's 10,100 newer succeeded tasks of another type.
        _, body = worker.get("/api/v1/tasks?status=succeeded&task_type=counted&limit=1000")
        routed = [t["task_id"] for t in body["tasks"] if t["task_id"].startswith(f"{topic}:")]
        return len(routed) == 3

    await eventually(all_ran, 30, "three routed tasks")
    assert [await _runs(p, task_id) for task_id in routed] == [1, 1, 1]
