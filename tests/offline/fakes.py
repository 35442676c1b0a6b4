"""What the offline push tests share: providers pointed at the local provider server,
notifications, offline-push records, a pusher, a dead-letter sink."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from resonance_task.embedded.providers import ProviderServer
from resonance_task.offline.apns import ApnsProvider, http2_client
from resonance_task.offline.fcm import FcmProvider, ServiceAccount
from resonance_task.offline.processor import OfflinePusher
from resonance_task.offline.provider import Notification
from resonance_task.offline.ratelimit import TokenBucket
from resonance_task.offline.records import encode as encode_offline
from resonance_task.offline.tokens import DeviceToken, RedisDeviceTokenStore
from resonance_task.offline.webhook import WebhookProvider
from resonance_task.pipeline.dlq import DeadLetters, SourceRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage, SessionMeta
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush

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


def note(provider: str, token: str, user: str = "alice") -> Notification:
    return Notification(
        user=user,
        device=DeviceToken(provider, token, "android"),
        title="bob",
        body="hi there",
        data={"msg_id": "42", "session_id": "single:alice:bob"},
        high_priority=True,
    )


class DeadSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        self.records.append((topic, value, dict(headers)))


def record(users: list[str], msg_id: int = 7, offset: int = 0) -> SourceRecord:
    push = OfflinePush(
        message=PushMessage(
            msg_id=msg_id,
            session_id="g1",
            from_username="bob",
            content="lunch?",
            type="text",
            session_meta=SessionMeta(name="team", type=2),
        ),
        users=users,
        reason="not_online",
    )
    (value,) = encode_offline([push], max_bytes=2**20)
    return SourceRecord("offline", 0, offset, None, value)


def pusher(
    p: Providers, tokens: RedisDeviceTokenStore, dead: DeadSink, **kw: float
) -> OfflinePusher:
    return OfflinePusher(
        tokens=tokens,
        providers={"fcm": p.fcm, "apns": p.apns, "webhook": p.webhook},
        dead_letters=DeadLetters(dead.send),
        max_attempts=int(kw.get("max_attempts", 3)),
        backoff_min=0.01,
        backoff_max=kw.get("backoff_max", 0.05),
    )
