"""Run `faust -A resonance_task.app worker` as a child process, the way an operator would.

Used by the demo, the end-to-end tests and the benchmarks: each gets a real worker
process (so kill -9 means kill -9), configured only through environment variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from resonance_task.embedded.broker import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def pipeline_env(
    *, tag: str, broker_url: str, redis_url: str, partitions: int = 4, **overrides: Any
) -> dict[str, str]:
    """Environment for one isolated pipeline: its own APP_ID and its own topic names."""
    env = {
        "APP_ID": f"rt-{tag}",
        "KAFKA_BROKER_URL": broker_url,
        "BROKER_PROFILE": "tansu",
        "REDIS_URL": redis_url,
        "TOPIC_PARTITIONS": str(partitions),
        "TOPIC_PUSH_EVENTS": f"{tag}.push.event.v1",
        "TOPIC_PRESENCE": f"{tag}.presence.v1",
        "TOPIC_HEARTBEATS": f"{tag}.gateway.heartbeat.v1",
        "TOPIC_OFFLINE_PUSHES": f"{tag}.offline.push.v1",
        "TOPIC_TASKS": f"{tag}.task.v1",
        "TOPIC_AUDIT_VERDICTS": f"{tag}.audit.verdict.v1",
        # Shared by name otherwise: a pipeline would serve another's stats reports.
        "TOPIC_STATS_HOURLY": f"{tag}.stats.hourly.v1",
        "GATEWAY_TIMEOUT_SECONDS": "5",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return env


def _body(raw: bytes) -> Any:
    """JSON views as JSON; anything else (/metrics) as text."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


class WorkerProcess:
    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        name: str = "worker",
        app: str = "resonance_task.app",
    ) -> None:
        self.app = app
        self.env = dict(env)
        self.workdir = workdir
        self.name = name
        self.port = int(env.get("WEB_PORT") or free_port())
        self.env["WEB_PORT"] = str(self.port)
        self.env.setdefault("DATA_DIR", str(workdir / f"{name}-data"))
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a worker killed with SIGKILL (the fault suite's) keeps its last lines.
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "faust", "-A", self.app, "worker", "-l", "info"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def get(self, path: str, timeout: float = 5.0, token: str | None = None) -> tuple[int, Any]:
        """GET a view, with the worker's own WEB_AUTH_TOKEN unless `token` is given."""
        return self.request("GET", path, timeout=timeout, token=token)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 5.0,
        token: str | None = None,
    ) -> tuple[int, Any]:
        """Call a view (`body` sent as JSON), with the worker's token unless given one."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        token = self.env.get("WEB_AUTH_TOKEN") if token is None else token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _body(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _body(exc.read())

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}); see {self.log_path}"
                )
            try:
                status, _ = self.get("/ready", timeout=1)
                if status == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit. Nothing to do once it has exited."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
