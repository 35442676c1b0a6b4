"""Make sure a Redis answers: the one configured, else a local redis-server we start.

Never a fake store: if no real Redis can be had, this says so and stops.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

import redis

from resonance_task.embedded.broker import free_port, wait_for_port


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


class LocalRedis:
    """A throwaway redis-server on a free loopback port, nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="resonance-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no Redis answers at REDIS_URL and no redis-server is on PATH: "
                "install Redis (apt-get install redis-server) or point REDIS_URL at one"
            )
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, 10, self._proc)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)
            self._proc = None
        self._dir.cleanup()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _cluster_ports(count: int) -> list[int]:
    """Free loopback ports whose cluster bus ports (port + 10000) are free too: an
    ephemeral port's bus port would lie past 65535."""
    rng = random.Random()
    found: list[int] = []
    while len(found) < count:
        port = rng.randrange(20000, 30000)
        if port in found:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        found.append(port)
    return found


class LocalRedisCluster:
    """A real Redis Cluster on loopback: `masters` redis-servers with `--cluster-enabled`,
    a replica each, joined by `redis-cli --cluster create`; nothing on disk but the nodes'
    own cluster files, removed at stop. `nodes[i]` is the i-th server's process, so a test
    can SIGKILL a master and watch its replica take over."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.masters = masters
        self.replicas = replicas
        self.ports = _cluster_ports(masters * (1 + replicas))
        self.nodes: list[subprocess.Popen[bytes]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="resonance-redis-cluster-")

    @property
    def url(self) -> str:
        """What REDIS_URL names a cluster by: any node, the scheme says cluster."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> LocalRedisCluster:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("a local Redis Cluster needs redis-server and redis-cli on PATH")
        for port in self.ports:
            self.nodes.append(
                subprocess.Popen(
                    [
                        server,
                        *("--port", str(port), "--bind", "127.0.0.1"),
                        *("--cluster-enabled", "yes", "--cluster-config-file", f"{port}.conf"),
                        # Fail over within seconds when a master is killed.
                        *("--cluster-node-timeout", "2000"),
                        *("--save", "", "--appendonly", "no", "--dir", self._dir.name),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        for port, proc in zip(self.ports, self.nodes, strict=True):
            wait_for_port(port, 10, proc)
        if self.masters < 3:
            # redis-cli creates clusters of 3 masters or more; a smaller one (a bench's
            # one-master cluster) is given every slot by hand.
            if self.replicas:
                raise ValueError("a cluster of fewer than 3 masters is made without replicas")
            for i, port in enumerate(self.ports):
                first, last = i * 16384 // self.masters, (i + 1) * 16384 // self.masters - 1
                node = redis.Redis(port=port)
                node.cluster("ADDSLOTSRANGE", first, last)
                if i:
                    node.cluster("MEET", "127.0.0.1", self.ports[0])
            self._wait_ok()
            return self
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._wait_ok()
        return self

    def _wait_ok(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ok = True
            for port in self.ports:
                try:
                    info = redis.Redis(port=port, socket_timeout=1).cluster("INFO")
                except redis.RedisError:
                    ok = False
                    break
                # redis-py parses CLUSTER INFO into a dict.
                ok = ok and isinstance(info, dict) and info.get("cluster_state") == "ok"
            if ok:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the local Redis Cluster on {self.ports} is not ok after {seconds}s")

    def stop(self) -> None:
        for proc in self.nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.nodes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.nodes = []
        self._dir.cleanup()

    def __enter__(self) -> LocalRedisCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()  # the nodes started before the failure: not left running
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
