"""Offline push fixtures: the local provider server and the providers pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from embedded.providers import ProviderServer
from offline.apns import ApnsProvider, http2_client
from offline.fcm import FcmProvider, ServiceAccount
from offline.ratelimit import TokenBucket
from offline.webhook import WebhookProvider

SECRET = "webhook-secret"


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass
class Providers:
    server: ProviderServer
    fcm: FcmProvider
    apns: ApnsProvider
    webhook: WebhookProvider
    rsa_public: rsa.RSAPublicKey
    ec_public: ec.EllipticCurvePublicKey


@pytest.fixture
async def server() -> AsyncIterator[ProviderServer]:
    async with ProviderServer(webhook_secret=SECRET) as running:
        yield running


def make_providers(
    server: ProviderServer, limits: dict[str, TokenBucket] | None = None
) -> tuple[Providers, list[httpx.AsyncClient]]:
    limits = limits or {}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    client = httpx.AsyncClient(timeout=5)
    h2 = http2_client(5)
    account = {
        "client_email": "pusher@demo.iam.gserviceaccount.com",
        "private_key": pem(rsa_key),
        "token_uri": server.url + "/token",
    }
    providers = Providers(
        server=server,
        fcm=FcmProvider(
            client=client,
            project_id="demo",
            credentials=ServiceAccount(account, client),
            base_url=server.url,
            limiter=limits.get("fcm"),
        ),
        apns=ApnsProvider(
            client=h2,
            team_id="TEAM123456",
            key_id="KEY1234567",
            private_key=pem(ec_key),
            topic="im.resonance.app",
            base_url=server.url,
            limiter=limits.get("apns"),
        ),
        webhook=WebhookProvider(
            client=client, url=server.url + "/webhook", secret=SECRET, limiter=limits.get("webhook")
        ),
        rsa_public=rsa_key.public_key(),
        ec_public=ec_key.public_key(),
    )
    return providers, [client, h2]


@pytest.fixture
async def providers(server: ProviderServer) -> AsyncIterator[Providers]:
    made, clients = make_providers(server)
    yield made
    for client in clients:
        await client.aclose()
