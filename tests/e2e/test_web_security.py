"""Who may call the web views, on a real worker: loopback by default, a bearer token
when set, Faust's own table views off, and a store that is away answered with 503."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest
import redis.asyncio as aioredis

from resonance_task.commands.traffic import single_chat
from resonance_task.settings import Settings
from tests.harness import Pipeline, PipelineFactory, eventually


@pytest.fixture
def redis_url(private_redis: str) -> str:
    """This module pauses every client of its Redis: a redis-server of its own."""
    return private_redis


TOKEN = "s3cret-token-for-tests"


def test_the_web_server_listens_on_loopback_unless_told() -> None:
    assert Settings.model_fields["web_host"].default == "127.0.0.1"


def _outside_address() -> str | None:
    """This machine's address on its default route, if it has one besides loopback."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_views_need_the_token_and_faust_table_views_are_off(
    pipeline_factory: PipelineFactory, redis_url: str
) -> None:
    p: Pipeline = pipeline_factory(web_auth_token=TOKEN, redis_timeout_seconds=0.5)
    worker = await p.start_worker()
    user = p.user(1)
    await p.publish([single_chat(p.user(0), user, 1, "private")])

    async def stored() -> bool:
        return len(await p.inbox(user)) == 1

    await eventually(stored, 30, "the message stored")
    inbox = f"/inbox/{user}"
    assert (await asyncio.to_thread(worker.get, inbox, token=""))[0] == 401
    assert (await asyncio.to_thread(worker.get, inbox, token="s3cret-token-for-test"))[0] == 401
    status, body = await asyncio.to_thread(worker.get, inbox)
    assert status == 200 and body["entries"][0]["message"]["content"] == "private"
    for path in ("/gateways", "/stats", f"/routes/{user}", "/large-groups"):
        assert (await asyncio.to_thread(worker.get, path, token=""))[0] == 401, path
    for path in ("/health", "/ready", "/metrics"):
        status, _ = await asyncio.to_thread(worker.get, path, token="")
        assert status in (200, 503) and status != 401, path
    # The status page, for browsers: a Basic challenge, and the token as its password.
    status_url = f"http://127.0.0.1:{worker.port}/status"
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, status_url, timeout=5)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"].startswith("Basic ")
    basic = "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    wrong = "Basic " + base64.b64encode(b"ops:guess").decode()
    for header, want in ((basic, 200), (wrong, 401)):
        request = urllib.request.Request(status_url, headers={"Authorization": header})
        try:
            with await asyncio.to_thread(urllib.request.urlopen, request, timeout=10) as page:
                assert page.status == want and b"<h2>Workers</h2>" in page.read()
        except urllib.error.HTTPError as exc:
            assert exc.code == want
    # Basic is for the browser's page only: the API still wants the bearer token.
    api = urllib.request.Request(f"http://127.0.0.1:{worker.port}{inbox}")
    api.add_header("Authorization", basic)
    with pytest.raises(urllib.error.HTTPError) as api_refused:
        await asyncio.to_thread(urllib.request.urlopen, api, timeout=5)
    assert api_refused.value.code == 401
    for path in ("/router/", "/table/", f"/table/routes/{user}/"):
        assert (await asyncio.to_thread(worker.get, path))[0] == 404, path
    # Ids the API cannot answer for are a 400, not a lookup of something else.
    assert (await asyncio.to_thread(worker.get, f"/inbox/{'u' * 300}"))[0] == 400
    bad = urllib.parse.quote("a{b}")
    assert (await asyncio.to_thread(worker.get, f"/inbox/{bad}"))[0] in (400, 404)

    outside = _outside_address()
    if outside is not None:
        with contextlib.suppress(OSError), socket.create_connection((outside, worker.port), 1):
            raise AssertionError(f"the web server answers on {outside}")

    # Redis paused: the API says "try again" (503), it does not fail (500).
    admin = aioredis.from_url(redis_url)
    try:
        await admin.client_pause(3000, all=True)
        status, body = await asyncio.to_thread(worker.get, inbox)
        assert status == 503 and "unavailable" in body["error"], (status, body)
    finally:
        await admin.client_unpause()
        await admin.aclose()
    assert (await asyncio.to_thread(worker.get, inbox))[0] == 200
