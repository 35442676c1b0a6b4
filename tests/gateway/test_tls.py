"""TLS and mutual TLS to a real grpc.aio gateway, with certificates made here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from resonance_task.gateway.client import GatewayPool, PushItem
from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.gateway.tls import channel_security
from tests.gateway.sessions import FAST, Outcomes, message
from tests.pki import FLEET_NAME, Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def _push(sim: GatewaySimulator, **security: str) -> list[str]:
    config = replace(FAST, security=channel_security(server_name=FLEET_NAME, **security))
    pool = GatewayPool(config)
    outcomes = Outcomes()
    pool.session(sim.gateway_id, sim.address).offer(
        PushItem(message(1), ["u0", "u1"], outcomes.handler(1))
    )
    await outcomes.wait(1)
    await pool.drain(1)
    ((_, outcome),) = outcomes.items
    return sorted(outcome.delivered)


async def _gateway(pki: Pki, *, mutual: bool) -> GatewaySimulator:
    sim = GatewaySimulator("gw-tls", bootstrap_servers=None, tls=pki.server(mutual=mutual))
    await sim.start()
    await sim.connect(["u0", "u1"])
    return sim


async def test_pushes_over_mutual_tls(pki: Pki) -> None:
    sim = await _gateway(pki, mutual=True)
    try:
        files = {k: str(v) for k, v in pki.files.items()}
        assert await _push(sim, **files) == ["u0", "u1"]
        assert len(sim.recorder.deliveries) == 2
    finally:
        await sim.stop()


async def test_a_gateway_requiring_a_client_certificate_refuses_a_worker_without_one(
    pki: Pki,
) -> None:
    sim = await _gateway(pki, mutual=True)
    try:
        assert await _push(sim, ca_file=str(pki.files["ca_file"])) == []
        assert sim.recorder.deliveries == []
    finally:
        await sim.stop()


async def test_tls_without_client_auth_and_a_gateway_we_cannot_verify(
    pki: Pki, tmp_path: Path
) -> None:
    sim = await _gateway(pki, mutual=False)
    try:
        assert await _push(sim, ca_file=str(pki.files["ca_file"])) == ["u0", "u1"]
        (tmp_path / "other").mkdir()
        other = Pki(tmp_path / "other")
        # A certificate from a CA we do not trust: no push goes to it.
        assert await _push(sim, ca_file=str(other.files["ca_file"])) == []
    finally:
        await sim.stop()


def test_half_a_client_certificate_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="go together"):
        channel_security(cert_file="worker.pem")
