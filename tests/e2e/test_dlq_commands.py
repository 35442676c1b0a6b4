"""`python -m resonance_task.commands.dlq` as an operator runs it, against the real broker:
it needs only Kafka (it runs where the app would not start), lists, dry-runs, and replays each dead
letter once, by reason or by an offset range."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from resonance_task.commands.dlq import read_all
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.worker import ROOT
from resonance_task.pipeline.dlq import DeadLetters, SourceRecord

pytestmark = pytest.mark.slow


async def _dead_letter(
    broker: EmbeddedBroker, topic: str, letters: list[tuple[str, bytes]]
) -> None:
    """Letters as a stage writes them: through DeadLetters, one record a request."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()

    async def send(
        dlq: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Any:
        return await producer.send_and_wait(dlq, value, key=key, headers=headers, partition=0)

    try:
        letters_out = DeadLetters(send)
        for offset, (reason, value) in enumerate(letters):
            record = SourceRecord(topic, 0, offset, b"k", value)
            await letters_out.put(record, reason, f"{reason} at {offset}")
    finally:
        await producer.stop()


def _run(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "resonance_task.commands.dlq", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def test_replay_sends_each_letter_once_and_needs_only_kafka(
    broker: EmbeddedBroker, tag: str, tmp_path: Path
) -> None:
    topic = f"{tag}.events"
    reasons = ["decode_error", "invalid", "decode_error", "invalid", "decode_error"]
    await _dead_letter(broker, topic, [(r, f"v{i}".encode()) for i, r in enumerate(reasons)])
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KAFKA_BROKER_URL": broker.url,
        "APP_ID": f"rt-{tag}",
        # A worker would not start (its offline stage): the APNs key file is missing.
        "OFFLINE_APNS_TEAM_ID": "TEAM",
        "OFFLINE_APNS_KEY_ID": "KEY",
        "OFFLINE_APNS_TOPIC": "com.example.im",
        "OFFLINE_APNS_KEY_FILE": str(tmp_path / "missing.p8"),
    }
    app_import = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "import app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    # Importing the app reads no key file: `faust -A resonance_task.app dlq-*` works too.
    assert app_import.returncode == 0, app_import.stderr[-2000:]

    dry = await asyncio.to_thread(_run, env, ROOT, "replay", "--topic", topic, "--dry-run")
    assert (dry["replayed"], dry["would_replay"]) == (0, 5)
    assert [r["reason"] for r in dry["records"]] == reasons
    assert await read_all(broker.bootstrap, topic, 100) == []

    first = await asyncio.to_thread(
        _run, env, ROOT, "replay", "--topic", topic, "--reason", "decode_error"
    )
    assert (first["replayed"], first["skipped_by_reason"]) == (3, 2)
    again = await asyncio.to_thread(
        _run, env, ROOT, "replay", "--topic", topic, "--reason", "decode_error"
    )
    assert again["replayed"] == 0  # committed: never twice
    back = sorted(r.value for r in await read_all(broker.bootstrap, topic, 100))
    assert back == [b"v0", b"v2", b"v4"]

    chosen = await asyncio.to_thread(
        _run, env, ROOT, "replay", "--topic", topic, "--partition", "0",
        "--from-offset", "1", "--to-offset", "1",
    )  # fmt: skip
    assert chosen["replayed"] == 1
    back = sorted(r.value for r in await read_all(broker.bootstrap, topic, 100))
    assert back == [b"v0", b"v1", b"v2", b"v4"]

    listing = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "resonance_task.commands.dlq", "list", "--topic", topic],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = listing.stdout.splitlines()
    assert [json.loads(line)["reason"] for line in listed] == reasons
