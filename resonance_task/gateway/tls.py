"""TLS to gateways: the worker verifies each gateway, and with a client certificate the
gateway can verify the worker (mutual TLS).

Gateways advertise `host:port` in their heartbeats, usually an IP address that is not in
their certificate: GATEWAY_TLS_SERVER_NAME names what the certificates do say (one name
for the fleet, e.g. `gateway.im.internal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from resonance_task.settings import Settings


@dataclass(frozen=True)
class ChannelSecurity:
    credentials: grpc.ChannelCredentials
    server_name: str = ""

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel_security(
    *, ca_file: str = "", cert_file: str = "", key_file: str = "", server_name: str = ""
) -> ChannelSecurity:
    """Credentials from PEM files; no CA file means the system's roots."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE go together (mTLS)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    return ChannelSecurity(credentials, server_name)


def from_settings(s: Settings) -> ChannelSecurity | None:
    """GATEWAY_TLS*: None (plaintext) unless GATEWAY_TLS is on."""
    if not s.gateway_tls:
        return None
    return channel_security(
        ca_file=s.gateway_tls_ca_file,
        cert_file=s.gateway_tls_cert_file,
        key_file=s.gateway_tls_key_file,
        server_name=s.gateway_tls_server_name,
    )
