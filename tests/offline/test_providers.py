"""Each provider against the local provider server: a real HTTP exchange each time."""

from __future__ import annotations

import hashlib
import hmac
import json

import jwt

from tests.offline.fakes import SECRET, Providers, note


async def test_fcm_trades_a_service_account_jwt_then_sends_per_token(
    providers: Providers,
) -> None:
    p = providers
    outcomes = await p.fcm.send([note("fcm", "tok-1"), note("fcm", "tok-2")])
    assert [o.result for o in outcomes] == ["delivered", "delivered"]
    (token_request,) = p.server.pushes("/token")
    claims = jwt.decode(
        token_request.body["assertion"],
        p.rsa_public,
        algorithms=["RS256"],
        audience=p.server.url + "/token",
    )
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    sends = p.server.pushes("/v1/projects/demo/messages:send")
    assert sorted(r.body["message"]["token"] for r in sends) == ["tok-1", "tok-2"]
    assert {r.headers["authorization"] for r in sends} == {"Bearer access-1"}  # cached
    assert sends[0].body["message"]["notification"] == {"title": "bob", "body": "hi there"}


async def test_fcm_unregistered_token_is_invalid(providers: Providers) -> None:
    p = providers
    p.server.invalid_tokens.add("gone")
    outcomes = await p.fcm.send([note("fcm", "gone"), note("fcm", "fine")])
    assert [o.result for o in outcomes] == ["invalid_token", "delivered"]


async def test_apns_speaks_http2_with_an_es256_provider_token(providers: Providers) -> None:
    p = providers
    p.server.invalid_tokens.add("dead-device")
    outcomes = await p.apns.send([note("apns", "a1b2"), note("apns", "dead-device")])
    assert [o.result for o in outcomes] == ["delivered", "invalid_token"]
    sends = p.server.pushes("/3/device/")
    assert {r.http_version for r in sends} == {"2"}
    ok = next(r for r in sends if r.path == "/3/device/a1b2")
    assert ok.headers["apns-topic"] == "im.resonance.app"
    assert ok.headers["apns-priority"] == "10"
    assert ok.body["aps"]["alert"] == {"title": "bob", "body": "hi there"}
    bearer = ok.headers["authorization"].removeprefix("bearer ")
    assert jwt.get_unverified_header(bearer)["kid"] == "KEY1234567"
    assert jwt.decode(bearer, p.ec_public, algorithms=["ES256"])["iss"] == "TEAM123456"


async def test_webhook_sends_one_signed_batch(providers: Providers) -> None:
    p = providers
    p.server.invalid_tokens.add("w-2")
    outcomes = await p.webhook.send([note("webhook", f"w-{i}", f"u{i}") for i in range(3)])
    assert [o.result for o in outcomes] == ["delivered", "delivered", "invalid_token"]
    (request,) = p.server.pushes("/webhook")
    raw = json.dumps(request.body).encode()
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert request.headers["x-resonance-signature"] == expected
    assert [n["user"] for n in request.body["notifications"]] == ["u0", "u1", "u2"]


async def test_throttling_and_outages_are_retryable(providers: Providers) -> None:
    p = providers
    p.server.fail_next(1, 429, retry_after=2)
    p.server.fail_next(1, 503)
    (first,) = await p.webhook.send([note("webhook", "w")])
    (second,) = await p.webhook.send([note("webhook", "w")])
    (third,) = await p.webhook.send([note("webhook", "w")])
    assert (first.result, first.retry_after) == ("retry", 2.0)
    assert second.result == "retry" and third.result == "delivered"
