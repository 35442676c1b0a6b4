"""The status page in a real browser: Debian's Chromium, headless, renders /status of a
worker with gateways, traffic, a dead letter and tasks; the test saves a screenshot."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from resonance_task.commands.traffic import single_chat
from resonance_task.pipeline.dlq import dlq_topic
from tests.harness import PipelineFactory, eventually

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    # .ci/run installs Debian's chromium and sets CI: there a missing browser fails.
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"),
        reason="no chromium here (apt install chromium)",
    ),
]


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None, "chromium is not installed (apt install chromium)"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # as root in CI
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            # This machine's network is closed: no background calls to Google's hosts.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


async def test_the_status_page_renders_in_headless_chromium(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    p = pipeline_factory(tasks_enabled=True)
    worker = await p.start_worker("status-worker")
    users = [p.user(i) for i in range(6)]
    await p.gateway("gw-a", users[:3])
    await p.gateway("gw-b", users[3:])
    await p.wait_online(worker, users)
    await p.publish([single_chat(users[0], u, 1, "hello") for u in users[1:]])
    await p.publish([b"\xff not a PushEvent"])
    status, body = await asyncio.to_thread(
        worker.request, "POST", "/api/v1/tasks", {"task_type": "noop", "task_id": f"{p.tag}-t1"}
    )
    assert status in (200, 201, 202), body

    dlq = dlq_topic(p.topic("TOPIC_PUSH_EVENTS"))

    async def shows_everything() -> bool:
        status, page = await asyncio.to_thread(worker.get, "/status")
        return status == 200 and f'<td>{dlq}</td><td class="n">1</td>' in page

    try:
        await eventually(shows_everything, 30, "the dead letter on the status page")
    except AssertionError:
        print((await asyncio.to_thread(worker.get, "/status"))[1])
        raise

    url = f"http://127.0.0.1:{worker.port}/status"
    dom = await asyncio.to_thread(_chromium, tmp_path, "--dump-dom", url)
    html = dom.stdout
    assert worker.proc is not None
    for expected in (
        f"{p.tag}-gw-a",
        f"{p.tag}-gw-b",
        f":{worker.proc.pid}</td>",  # the worker's name: host:pid
        "Lag per topic",
        p.topic("TOPIC_PUSH_EVENTS"),
        "Large-group jobs",
    ):
        assert expected in html, expected
    assert html.count('class="ok">up</td>') == 2  # both gateways
    assert "not available now" not in html

    screenshot = tmp_path / "status.png"
    await asyncio.to_thread(
        _chromium, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,1400", url
    )
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a page with tables, not a blank one
    print(f"status page screenshot: {screenshot}")
