"""TLS and mutual TLS to a real grpc.aio gateway, with certificates made here."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.client import GatewayPool, PushItem
from gateway.simulator import GatewaySimulator
from gateway.tls import channel_security
from tests.gateway.test_client import FAST, Outcomes, message

FLEET_NAME = "gateway.im.internal"  # the name in the gateways' certificate, not the IP


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if usage is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
    return builder.sign(issuer_key, hashes.SHA256()), key


class Pki:
    """A CA, a gateway certificate for FLEET_NAME and a worker (client) certificate."""

    def __init__(self, directory: Path) -> None:
        ca, ca_key = _issue("resonance test CA", None, None)
        self.ca = ca.public_bytes(serialization.Encoding.PEM)
        server, server_key = _issue(
            FLEET_NAME, (ca.subject, ca_key), ExtendedKeyUsageOID.SERVER_AUTH
        )
        self.server_cert = server.public_bytes(serialization.Encoding.PEM)
        self.server_key = _pem_key(server_key)
        client, client_key = _issue(
            "worker-1", (ca.subject, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
        )
        self.files = {
            "ca_file": directory / "ca.pem",
            "cert_file": directory / "worker.pem",
            "key_file": directory / "worker.key",
        }
        self.files["ca_file"].write_bytes(self.ca)
        self.files["cert_file"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
        self.files["key_file"].write_bytes(_pem_key(client_key))

    def server(self, *, mutual: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.server_key, self.server_cert)],
            root_certificates=self.ca if mutual else None,
            require_client_auth=mutual,
        )


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
