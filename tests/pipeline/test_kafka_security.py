"""Kafka TLS/SASL settings reach Faust's clients and ours alike."""

from __future__ import annotations

import ssl
from pathlib import Path

from faust.auth import SASLCredentials, SSLCredentials

from resonance_task.pipeline.kafka_security import aiokafka_auth, faust_credentials
from resonance_task.settings import Settings
from tests.pki import Pki


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def test_plaintext_by_default() -> None:
    s = settings()
    assert faust_credentials(s) is None
    assert aiokafka_auth(s) == {"security_protocol": "PLAINTEXT"}


def test_tls_with_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    files = Pki(tmp_path).files
    s = settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(files["ca_file"]),
        kafka_ssl_certfile=str(files["cert_file"]),
        kafka_ssl_keyfile=str(files["key_file"]),
    )
    auth = aiokafka_auth(s)
    assert auth["security_protocol"] == "SSL"
    context = auth["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.get_ca_certs()[0]["subject"] == ((("commonName", "resonance test CA"),),)
    credentials = faust_credentials(s)
    assert isinstance(credentials, SSLCredentials)


def test_sasl_scram_over_tls(tmp_path: Path) -> None:
    files = Pki(tmp_path).files
    s = settings(
        kafka_security_protocol="SASL_SSL",
        kafka_ssl_cafile=str(files["ca_file"]),
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="resonance",
        kafka_sasl_password="pw",
    )
    auth = aiokafka_auth(s)
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("resonance", "pw")
    credentials = faust_credentials(s)
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert (credentials.username, credentials.password) == ("resonance", "pw")
