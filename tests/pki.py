"""Certificates made by the tests: a CA, a server certificate and a client certificate,
for TLS and mutual TLS to gateways (gRPC) and to the Kafka broker."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    ips: Sequence[str] = (),
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
        names: list[x509.GeneralName] = [x509.DNSName(name)]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(issuer_key, hashes.SHA256()), key


class Pki:
    """A CA, a server certificate for `server_name` (and `server_ips`) and a worker
    (client) certificate, written as PEM files under `directory`."""

    def __init__(
        self, directory: Path, server_name: str = FLEET_NAME, server_ips: Sequence[str] = ()
    ) -> None:
        ca, ca_key = _issue("resonance test CA", None, None)
        self.ca = ca.public_bytes(serialization.Encoding.PEM)
        server, server_key = _issue(
            server_name, (ca.subject, ca_key), ExtendedKeyUsageOID.SERVER_AUTH, server_ips
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
        self.server_files = {
            "cert_file": directory / "server.pem",
            "key_file": directory / "server.key",
        }
        self.server_files["cert_file"].write_bytes(self.server_cert)
        self.server_files["key_file"].write_bytes(self.server_key)

    def server(self, *, mutual: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.server_key, self.server_cert)],
            root_certificates=self.ca if mutual else None,
            require_client_auth=mutual,
        )

    def server_context(self, *, mutual: bool) -> ssl.SSLContext:
        """The server side as Python's ssl module serves it (a TLS listener of our own)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_files["cert_file"], self.server_files["key_file"])
        if mutual:
            context.load_verify_locations(cadata=self.ca.decode())
            context.verify_mode = ssl.CERT_REQUIRED
        return context
