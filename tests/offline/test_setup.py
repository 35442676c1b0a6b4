"""The offline stage the settings configure: providers are built at its start, not at
import, so a command that only needs Kafka runs even when a push key file is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resonance_task.embedded.worker import ROOT
from resonance_task.offline.setup import offline_stage
from resonance_task.pipeline.dlq import DeadLetters
from resonance_task.settings import Settings
from resonance_task.stage import StageOptions

APNS_MISSING_KEY = {
    "OFFLINE_APNS_TEAM_ID": "TEAM123456",
    "OFFLINE_APNS_KEY_ID": "KEY1234567",
    "OFFLINE_APNS_KEY_FILE": "/nonexistent/AuthKey.p8",
    "OFFLINE_APNS_TOPIC": "im.example.app",
}


async def _nowhere(*_: object) -> None:
    raise AssertionError("nothing is dead-lettered here")


async def test_a_missing_key_file_fails_the_stage_at_its_start_not_its_construction() -> None:
    settings = Settings.model_validate({k.lower(): v for k, v in APNS_MISSING_KEY.items()})
    options = StageOptions(
        topics=("offline",),
        consumer_config={"bootstrap_servers": "127.0.0.1:9", "group_id": "g"},
        batch_max_records=settings.offline_batch_max_records,
    )
    stage = offline_stage(settings, options, dead_letters=DeadLetters(_nowhere))
    assert stage is not None
    with pytest.raises(FileNotFoundError, match=r"AuthKey\.p8"):
        await stage.on_start()


def test_a_kafka_only_command_runs_with_the_apns_key_file_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "faust", "-A", "resonance_task.app", "dlq-list", "--help"],
        cwd=ROOT,
        env={**env, **APNS_MISSING_KEY, "DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--limit" in result.stdout
