"""The offline push stage when providers throttle, fail or break: what is retried, when,
and what reaches the dead-letter topic. Real Redis, the real local provider server."""

from __future__ import annotations

import httpx

from resonance_task.offline.fcm import FcmProvider, ServiceAccount, StaticToken
from resonance_task.offline.processor import OfflinePusher
from resonance_task.offline.tokens import DeviceToken, RedisDeviceTokenStore
from resonance_task.pipeline.dlq import H_ERROR, H_REASON, DeadLetters
from tests.offline.fakes import DeadSink, Providers, note, pusher, record

FCM_SEND = "/v1/projects/demo/messages:send"


async def test_retry_after_is_honoured_and_holds_back_no_other_provider(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    ann, ben = f"{tag}-ann", f"{tag}-ben"
    await tokens.register(ann, DeviceToken("apns", f"{tag}-ios"))
    await tokens.register(ben, DeviceToken("fcm", f"{tag}-android"))
    server = providers.server
    server.fail_next(1, 429, retry_after=0.4, path_prefix="/3/device/")
    server.fail_next(1, 503, path_prefix=FCM_SEND)
    dead = DeadSink()
    await pusher(providers, tokens, dead, backoff_max=1.0).handle([record([ann, ben])])
    apns, fcm = server.pushes("/3/device/"), server.pushes(FCM_SEND)
    assert len(apns) == 2 and len(fcm) == 2 and dead.records == []
    assert apns[1].at - apns[0].at >= 0.4  # as the provider asked, not our 10 ms backoff
    assert fcm[1].at < apns[1].at  # FCM's retry did not wait for APNs's


async def test_a_retry_after_beyond_the_backoff_cap_is_cut_to_it(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    user = f"{tag}-cy"
    await tokens.register(user, DeviceToken("webhook", f"{tag}-web"))
    providers.server.fail_next(1, 429, retry_after=3600)
    await pusher(providers, tokens, DeadSink(), backoff_max=0.2).handle([record([user])])
    first, second = providers.server.pushes("/webhook")
    assert second.at - first.at < 0.5


async def test_a_failing_provider_dead_letters_its_records_only(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    ann, ben = f"{tag}-ann", f"{tag}-ben"
    await tokens.register(ann, DeviceToken("apns", f"{tag}-ios"))
    await tokens.register(ben, DeviceToken("fcm", f"{tag}-android"))
    providers.server.fail_next(100, 500, path_prefix="/3/device/")
    dead = DeadSink()
    await pusher(providers, tokens, dead).handle(
        [record([ann], msg_id=21, offset=1), record([ben], msg_id=22, offset=2)]
    )
    assert len(providers.server.pushes("/3/device/")) == 3  # max_attempts
    assert len(providers.server.pushes(FCM_SEND)) == 1
    ((topic, _, headers),) = dead.records
    assert topic == "offline.dlq" and headers[H_REASON] == b"provider_failed"
    assert headers["dlq.offset"] == b"1" and b"apns:500" in headers[H_ERROR]


async def test_invalid_tokens_are_forgotten_for_apns_and_the_webhook(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    user = f"{tag}-dan"
    keep = DeviceToken("apns", f"{tag}-ok", "ios")
    await tokens.register(user, keep)
    await tokens.register(user, DeviceToken("apns", f"{tag}-old", "ios"))
    await tokens.register(user, DeviceToken("webhook", f"{tag}-gone", "web"))
    providers.server.invalid_tokens |= {f"{tag}-old", f"{tag}-gone"}
    dead = DeadSink()
    await pusher(providers, tokens, dead).handle([record([user])])
    assert await tokens.tokens([user]) == {user: [keep]}
    assert dead.records == []


async def test_a_provider_that_raises_is_dead_lettered_not_fatal(
    providers: Providers, tokens: RedisDeviceTokenStore, tag: str
) -> None:
    user = f"{tag}-eve"
    await tokens.register(user, DeviceToken("fcm", f"{tag}-android"))
    await tokens.register(user, DeviceToken("webhook", f"{tag}-web"))
    server = providers.server
    async with httpx.AsyncClient(timeout=5) as client:
        # A service account whose key does not sign: a misconfiguration, not an HTTP error.
        broken = ServiceAccount(
            {"client_email": "x@demo", "private_key": "not a key", "token_uri": server.url},
            client,
        )
        fcm = FcmProvider(client=client, project_id="demo", credentials=broken, base_url=server.url)
        dead = DeadSink()
        await OfflinePusher(
            tokens=tokens,
            providers={"fcm": fcm, "webhook": providers.webhook},
            dead_letters=DeadLetters(dead.send),
            max_attempts=2,
            backoff_min=0.01,
            backoff_max=0.02,
        ).handle([record([user])])
    assert server.pushes(FCM_SEND) == [] and len(server.pushes("/webhook")) == 1
    ((_, _, headers),) = dead.records
    assert headers[H_REASON] == b"provider_failed" and b"fcm:" in headers[H_ERROR]


async def test_fcm_with_a_static_access_token(providers: Providers, tag: str) -> None:
    server = providers.server
    server.accept_access_token("static-token")
    async with httpx.AsyncClient(timeout=5) as client:
        fcm = FcmProvider(
            client=client,
            project_id="demo",
            credentials=StaticToken("static-token"),
            base_url=server.url,
        )
        (outcome,) = await fcm.send([note("fcm", f"{tag}-t")])
    assert outcome.result == "delivered"
    assert server.pushes("/token") == []
    assert server.pushes(FCM_SEND)[0].headers["authorization"] == "Bearer static-token"
