from __future__ import annotations

import pytest
from pydantic import ValidationError

from resonance_task.settings import Settings


def test_environment_names_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BROKER_URL", "kafka://10.0.0.1:9092;kafka://10.0.0.2:9092")
    monkeypatch.setenv("TOPIC_PARTITIONS", "12")
    monkeypatch.setenv("REDIS_URL", "redis://:pw-8c1f@cache:6379/0")
    monkeypatch.setenv("OFFLINE_WEBHOOK_SECRET", "hook-4e2a")
    s = Settings()
    assert s.bootstrap_servers == ["10.0.0.1:9092", "10.0.0.2:9092"]
    assert s.topic_partitions == 12
    assert s.inbox_redis == "redis://:pw-8c1f@cache:6379/0"
    assert "pw-8c1f" not in repr(s) and "hook-4e2a" not in repr(s)
    assert s.broker_profile == "kafka"


def test_bad_broker_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BROKER_URL", "10.0.0.1:9092")
    with pytest.raises(ValidationError, match="kafka://host:port"):
        Settings()


def test_readme_documents_every_knob() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [f for f in Settings.model_fields if f"`{f.upper()}`" not in readme]
    assert missing == [], f"add these to README.md's configuration table: {missing}"


def test_postgres_backends_need_a_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INBOX_BACKEND", "postgres")
    with pytest.raises(ValidationError, match="POSTGRES_DSN"):
        Settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INBOX_ARCHIVE_KEEP_ENTRIES": "100"}, "POSTGRES_DSN"),
        (
            {"INBOX_ARCHIVE_KEEP_ENTRIES": "6000", "POSTGRES_DSN": "postgresql://h/db"},
            "at most INBOX_MAX_ENTRIES",
        ),
        (
            {"INBOX_ARCHIVE_AFTER_SECONDS": "700000", "POSTGRES_DSN": "postgresql://h/db"},
            "under MESSAGE_TTL_SECONDS",
        ),
    ],
)
def test_an_archive_that_could_not_work_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_a_worker_listening_everywhere_advertises_a_name_others_can_reach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEB_HOST", "0.0.0.0")
    monkeypatch.setenv("WEB_PORT", "7001")
    url = Settings().canonical_url
    assert "0.0.0.0" not in url and url.endswith(":7001"), url
    monkeypatch.setenv("WEB_CANONICAL_URL", "http://worker-3.resonance.svc:7001/")
    assert Settings().canonical_url == "http://worker-3.resonance.svc:7001"
    monkeypatch.delenv("WEB_CANONICAL_URL")
    monkeypatch.setenv("WEB_HOST", "10.1.2.3")
    assert Settings().canonical_url == "http://10.1.2.3:7001"


def test_readme_documents_every_metric() -> None:
    import re
    from pathlib import Path

    from prometheus_client.metrics import MetricWrapperBase

    from resonance_task.offline import metrics as offline_metrics
    from resonance_task.pipeline import metrics as pipeline_metrics

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = set(re.findall(r"^\| `([a-z_]+)` \|", readme, re.MULTILINE))
    exported = {
        m._name + ("_total" if m._type == "counter" else "")
        for module in (pipeline_metrics, offline_metrics)
        for m in vars(module).values()
        if isinstance(m, MetricWrapperBase)
    }
    assert exported - table == set(), "add these to README.md's metrics table"
    stale = {name for name in table if name.startswith(("resonance_", "task_"))} - exported
    assert stale == set(), "README.md's metrics table names metrics that do not exist"
