"""Who may call the worker's web views.

With WEB_AUTH_TOKEN set, every view asks for `Authorization: Bearer <token>`, except
the ones a load balancer, an orchestrator and Prometheus call without credentials:
/health, /ready and /metrics. Without a token the server should stay on loopback
(WEB_HOST's default): inboxes hold message content.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
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
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            # web/errors.py answers it as JSON, as every other refusal.
            raise web.HTTPUnauthorized(
                text="a bearer token is required (Authorization: Bearer <WEB_AUTH_TOKEN>)",
                headers={"WWW-Authenticate": 'Bearer realm="resonance-task"'},
            )
        return await handler(request)

    return require_bearer


def warn_if_open(host: str, *, protected: bool) -> None:
    if not protected and host not in LOOPBACK:
        log.warning(
            "the web server listens on %s with no WEB_AUTH_TOKEN: anyone who can reach it "
            "can read every inbox",
            host,
        )
