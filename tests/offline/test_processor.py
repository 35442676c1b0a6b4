"""The offline push stage: real Redis device tokens, the real local provider server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from embedded.providers import ProviderServer
from offline.processor import OfflinePusher
from offline.ratelimit import TokenBucket
from offline.tokens import DeviceToken, RedisDeviceTokenStore
from pipeline.dlq import H_REASON, DeadLetters, SourceRecord
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage, SessionMeta
from proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush
from tests.offline.conftest import Providers, make_providers


class DeadSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        self.records.append((topic, value, dict(headers)))


@pytest.fixture
async def tokens(redis_url: str) -> AsyncIterator[RedisDeviceTokenStore]:
    store = RedisDeviceTokenStore(redis_url)
    yield store
    await store.close()


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
    return SourceRecord("offline", 0, offset, str(msg_id).encode(), push.SerializeToString())


def pusher(
    p: Providers, tokens: RedisDeviceTokenStore, dead: DeadSink, **kw: float
) -> OfflinePusher:
    return OfflinePusher(
        tokens=tokens,
        providers={"fcm": p.fcm, "apns": p.apns, "webhook": p.webhook},
        dead_letters=DeadLetters(dead.send),
        max_attempts=int(kw.get("max_attempts", 3)),
        backoff_min=0.01,
        backoff_max=0.05,
    )


async def test_offline_users_reach_their_devices_and_dead_tokens_are_forgotten(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    alice, bob, carol, dave = (f"{tag}-{n}" for n in ("alice", "bob", "carol", "dave"))
    await tokens.register(alice, DeviceToken("fcm", f"{tag}-a1", "android"))
    await tokens.register(bob, DeviceToken("apns", f"{tag}-b1", "ios"))
    await tokens.register(bob, DeviceToken("webhook", f"{tag}-b2", "web"))
    await tokens.register(dave, DeviceToken("fcm", f"{tag}-gone", "android"))
    providers.server.invalid_tokens.add(f"{tag}-gone")
    dead = DeadSink()
    await pusher(providers, tokens, dead).handle(
        [record([alice, bob, carol, dave]), SourceRecord("offline", 0, 1, None, b"\xff\x00")]
    )
    server = providers.server
    fcm = server.pushes("/v1/projects/demo/messages:send")
    assert sorted(r.body["message"]["token"] for r in fcm) == sorted([f"{tag}-a1", f"{tag}-gone"])
    assert fcm[0].body["message"]["notification"] == {"title": "bob in team", "body": "lunch?"}
    assert fcm[0].body["message"]["data"]["msg_id"] == "7"
    assert [r.path for r in server.pushes("/3/device/")] == [f"/3/device/{tag}-b1"]
    (hook,) = server.pushes("/webhook")
    assert [n["token"] for n in hook.body["notifications"]] == [f"{tag}-b2"]
    assert await tokens.tokens([dave]) == {}  # FCM said UNREGISTERED: forgotten
    assert len((await tokens.tokens([alice, bob]))[bob]) == 2
    # Only the garbage record is dead: no device (carol) is not a failure.
    assert [h[H_REASON] for _, _, h in dead.records] == [b"decode_error"]


async def test_retries_then_the_record_goes_to_the_dead_letter_topic(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    user = f"{tag}-erin"
    await tokens.register(user, DeviceToken("webhook", f"{tag}-e1"))
    providers.server.fail_next(1, 503)
    dead = DeadSink()
    await pusher(providers, tokens, dead).handle([record([user], msg_id=8)])
    assert len(providers.server.pushes("/webhook")) == 2 and dead.records == []  # retried, ok

    providers.server.fail_next(3, 500)
    await pusher(providers, tokens, dead).handle([record([user], msg_id=9, offset=5)])
    ((topic, value, headers),) = dead.records
    assert topic == "offline.dlq" and headers[H_REASON] == b"provider_failed"
    assert OfflinePush.FromString(value or b"").message.msg_id == 9
    assert b"webhook" in headers["dlq.error"]


async def test_the_rate_limit_holds(
    server: ProviderServer, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    limit = 40.0
    p, clients = make_providers(server, {"fcm": TokenBucket(limit, burst=1)})
    users = [f"{tag}-r{i:03d}" for i in range(120)]
    for user in users:
        await tokens.register(user, DeviceToken("fcm", f"{user}-t"))
    await pusher(p, tokens, DeadSink()).handle([record(users)])
    for client in clients:
        await client.aclose()
    sends = server.pushes("/v1/projects/demo/messages:send")
    assert len(sends) == 120
    rate = (len(sends) - 1) / (sends[-1].at - sends[0].at)
    assert abs(rate - limit) / limit <= 0.10, rate
