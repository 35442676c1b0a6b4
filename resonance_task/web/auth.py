"""Who may call the worker's web views.

With WEB_AUTH_TOKEN set, every view asks for `Authorization: Bearer <token>`, except
the ones a load balancer, an orchestrator and Prometheus call without credentials:
/health, /ready and /metrics. The pages people open in a browser (/status), which cannot
send a bearer header, also take the token as HTTP Basic's password: the browser asks.
Without a token the server should stay on loopback (WEB_HOST's default): inboxes hold
message content.
"""

from __future__ import annotations

import base64
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
BROWSER_PATHS = frozenset({"/status"})
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_middleware(
    token: str,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = token.encode()

    @web.middleware
    async def require_bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.rstrip("/") in OPEN_PATHS:
            return await handler(request)
        browser = request.path.rstrip("/") in BROWSER_PATHS
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        scheme = scheme.lower()
        if browser and scheme == "basic":
            given = _basic_password(given)
        elif scheme != "bearer":
            given = ""
        # compare_digest: the time taken does not tell how much of a guess was right.
        if not given or not hmac.compare_digest(given.strip().encode(), expected):
            challenge = (
                'Basic realm="resonance-task", charset="UTF-8"'
                if browser
                else 'Bearer realm="resonance-task"'
            )
            # web/errors.py answers it as JSON, as every other refusal.
            raise web.HTTPUnauthorized(
                text="a bearer token is required (Authorization: Bearer <WEB_AUTH_TOKEN>)",
                headers={"WWW-Authenticate": challenge},
            )
        return await handler(request)

    return require_bearer


def _basic_password(credentials: str) -> str:
    """The password of HTTP Basic credentials (any user name), or "" if malformed."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def warn_if_open(host: str, *, protected: bool) -> None:
    if not protected and host not in LOOPBACK:
        log.warning(
            "the web server listens on %s with no WEB_AUTH_TOKEN: anyone who can reach it "
            "can read every inbox",
            host,
        )
