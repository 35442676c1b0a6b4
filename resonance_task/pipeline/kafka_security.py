"""Kafka TLS and SASL, the same for Faust's clients and ours (stages, views, commands).

KAFKA_SECURITY_PROTOCOL picks the listener kind, as in Kafka's own client settings;
the CA, certificate and key files are PEM; SASL takes PLAIN or SCRAM credentials.
"""

from __future__ import annotations

import functools
import ssl
from typing import TYPE_CHECKING, Any

from aiokafka.helpers import create_ssl_context
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import CredentialsT

if TYPE_CHECKING:
    from resonance_task.settings import Settings


def ssl_context(s: Settings) -> ssl.SSLContext | None:
    if s.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return _context(s.kafka_ssl_cafile, s.kafka_ssl_certfile, s.kafka_ssl_keyfile)


@functools.cache
def _context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    # One context for every client of the worker: the files are read once.
    context: ssl.SSLContext = create_ssl_context(
        cafile=cafile or None, certfile=certfile or None, keyfile=keyfile or None
    )
    return context


def _password(s: Settings) -> str:
    return s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else ""


def faust_credentials(s: Settings) -> CredentialsT | None:
    """Faust's `broker_credentials` (None: plaintext)."""
    context = ssl_context(s)
    if s.kafka_security_protocol.startswith("SASL"):
        return SASLCredentials(
            username=s.kafka_sasl_username,
            password=_password(s),
            ssl_context=context,
            mechanism=s.kafka_sasl_mechanism,
        )
    if context is not None:
        return SSLCredentials(context)
    return None


def aiokafka_auth(s: Settings) -> dict[str, Any]:
    """Keyword arguments for an aiokafka consumer or producer of ours: Faust's own mapping
    of the same credentials, so its clients and ours cannot disagree."""
    return dict(credentials_to_aiokafka_auth(faust_credentials(s)))
