"""`task-dlq-replay`: dead tasks back into the first retry stage, as the API's replay does.

Reads the task DLQ (`dlq-list --topic <TOPIC_TASKS>` lists it), keeps each task's last
letter, and sends again only tasks whose status is still `dead` (or gone: written anew
from the letter). Running it twice replays nothing twice: a replayed task is no longer
dead. Needs Kafka and Redis only.
"""

from __future__ import annotations

import json
from typing import Any

from aiokafka import AIOKafkaProducer
from faust.cli import option
from google.protobuf.message import DecodeError

from resonance_task.commands.dlq import describe, read_all
from resonance_task.pipeline.dlq import dlq_topic
from resonance_task.pipeline.kafka_security import aiokafka_auth
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.settings import Settings


def register(app: Any, settings: Settings) -> None:
    @app.command(
        option("--task-id", "task_ids", multiple=True, help="only these tasks (repeatable)"),
        option("--reason", default="", help="only letters of this reason"),
        option("--limit", type=int, default=100_000, help="letters read at most"),
        option("--dry-run", is_flag=True, help="say what would be replayed, send nothing"),
    )
    async def task_dlq_replay(
        self: Any, task_ids: tuple[str, ...], reason: str, limit: int, dry_run: bool
    ) -> None:
        """Send dead tasks back into the first retry stage, attempts from zero."""
        from resonance_task.tasks.setup import retry_topic_names
        from resonance_task.tasks.stages import run_again
        from resonance_task.tasks.status import TaskStatuses

        letters: dict[str, tuple[Task, dict[str, Any]]] = {}
        auth = aiokafka_auth(settings)  # the cluster's SASL/TLS, as every client of ours
        for record in await read_all(
            settings.bootstrap_servers, dlq_topic(settings.topic_tasks), limit, **auth
        ):
            about = describe(record)
            try:
                task = Task.FromString(record.value or b"")
            except DecodeError:
                continue  # a record that never decoded as a task has no status to revive
            if not task.task_id or (task_ids and task.task_id not in task_ids):
                continue
            if reason and about["reason"] != reason:
                continue
            letters[task.task_id] = (task, about)
        statuses = TaskStatuses.from_settings(settings)
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **auth)
        await producer.start()
        retry_topic = retry_topic_names(settings)[0]

        async def first_retry(key: bytes | None, value: bytes, partition: int | None) -> Any:
            return await producer.send(retry_topic, value, key=key, partition=partition)

        replayed, skipped = [], {}
        try:
            for task_id, (task, about) in letters.items():
                if dry_run:
                    status = await statuses.get(task_id)
                    state = status["state"] if status else "missing"
                    if state in ("dead", "missing"):
                        replayed.append(task_id)
                    else:
                        skipped[task_id] = state
                    continue
                refused = await run_again(task_id, "dead", statuses, first_retry, letter=task)
                if refused is None:
                    replayed.append(task_id)
                    print(json.dumps({"replayed": task_id, "reason": about["reason"]}))
                else:
                    skipped[task_id] = refused
        finally:
            await producer.stop()
            await statuses.close()
        print(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "replayed": len(replayed),
                    "skipped": skipped,
                    "to": retry_topic,
                    **({"would_replay": replayed} if dry_run else {}),
                }
            )
        )
