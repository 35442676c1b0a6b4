"""A worker against a Kafka listener that speaks only TLS and wants a client certificate.

Tansu 0.6 serves plaintext only (with both --cert and --key it does not start), so the
test puts a TLS terminator of its own in front of it and Tansu advertises the
terminator's port: every connection a client opens, to bootstrap and then to the
advertised broker, is TLS with a certificate checked both ways. Faust's consumers and
producer, our stage consumers, topic views, the gateway simulator and the test's own
clients all go through it, as they would to a Kafka listener with `ssl.client.auth`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from resonance_task.commands.dlq import read_all
from resonance_task.commands.traffic import single_chat
from resonance_task.embedded.broker import EmbeddedBroker, free_port
from resonance_task.embedded.worker import WorkerProcess, pipeline_env
from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.offline.records import decode as decode_offline
from resonance_task.pipeline.kafka_security import aiokafka_auth
from resonance_task.settings import Settings
from resonance_task.stores.inbox import RedisInboxStore
from tests.harness import eventually
from tests.pki import Pki

pytestmark = pytest.mark.slow


class TlsTerminator:
    """TLS (mutual) on one port, plaintext to the broker behind it."""

    def __init__(self, context: ssl.SSLContext, upstream_port: int) -> None:
        self._context = context
        self._upstream = upstream_port
        self._server: asyncio.Server | None = None
        self.clients: list[str] = []  # the common name of each client certificate
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self, port: int) -> TlsTerminator:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port, ssl=self._context)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        self.clients.append(dict(x[0] for x in peer.get("subject", ())).get("commonName", ""))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def test_a_worker_runs_against_a_broker_that_wants_mutual_tls(
    tmp_path: Path, redis_url: str, tag: str
) -> None:
    pki = Pki(tmp_path, server_name="localhost", server_ips=["127.0.0.1"])
    tls_port = free_port()
    security: dict[str, Any] = {
        "kafka_security_protocol": "SSL",
        "kafka_ssl_cafile": str(pki.files["ca_file"]),
        "kafka_ssl_certfile": str(pki.files["cert_file"]),
        "kafka_ssl_keyfile": str(pki.files["key_file"]),
    }
    auth = aiokafka_auth(Settings.model_validate(security))
    bootstrap = f"127.0.0.1:{tls_port}"
    env = pipeline_env(
        tag=tag,
        broker_url=f"kafka://{bootstrap}",
        redis_url=redis_url,
        tasks_enabled=False,
        **security,
    )
    inbox = RedisInboxStore(redis_url, max_entries=0, message_ttl=3600)
    online, offline = f"{tag}-u00000", f"{tag}-u00001"
    with EmbeddedBroker(log_file=tmp_path / "tansu.log", advertised_port=tls_port) as broker:
        terminator = await TlsTerminator(pki.server_context(mutual=True), broker.port).start(
            tls_port
        )
        worker = WorkerProcess(env, tmp_path, "tls").start()
        sim = GatewaySimulator(
            f"{tag}-gw",
            bootstrap_servers=bootstrap,
            presence_topic=env["TOPIC_PRESENCE"],
            heartbeat_topic=env["TOPIC_HEARTBEATS"],
            heartbeat_interval=0.5,
            kafka_config=auth,
        )
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **auth)
        try:
            await asyncio.to_thread(worker.wait_ready)
            await sim.start()
            await sim.connect([online])
            await sim.flush_presence()

            async def routed() -> bool:
                status, body = await asyncio.to_thread(worker.get, f"/routes/{online}")
                return status == 200 and bool(body["online_gateways"])

            await eventually(routed, 30, "the route that came over TLS")
            await producer.start()
            for n, to in enumerate((online, offline), 1):
                event = single_chat(f"{tag}-sender", to, n, "over tls")
                await producer.send_and_wait(
                    env["TOPIC_PUSH_EVENTS"], event.SerializeToString(), key=b"s"
                )

            async def delivered() -> bool:
                return len(sim.recorder.deliveries) == 1

            await eventually(delivered, 60, "the push to the online user")
            assert sim.recorder.deliveries[0].user == online
            assert [len(await inbox.read(u, 0, 10)) for u in (online, offline)] == [1, 1]
            records = await read_all(bootstrap, env["TOPIC_OFFLINE_PUSHES"], 100, **auth)
            pushed = [push for r in records for push in decode_offline(r.value)]
            assert [list(p.users) for p in pushed] == [[offline]]
        except Exception:
            print(worker.log_tail())
            raise
        finally:
            worker.kill()
            await sim.stop()
            await producer.stop()
            await inbox.close()

        try:
            # Every connection was TLS with our client certificate; a plaintext client
            # gets nowhere.
            assert len(terminator.clients) >= 4 and set(terminator.clients) == {"worker-1"}
            plain = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=2000)
            with pytest.raises(KafkaConnectionError):
                await plain.start()
            await plain.stop()
        finally:
            await terminator.stop()
