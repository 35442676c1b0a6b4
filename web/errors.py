"""Errors as JSON: `{"error": "..."}` with the right status, for every request.

aiohttp answers its own refusals (no such path, method not allowed, a request line too
long) with plain text, and an exception in a view with an HTML page; clients of a JSON
API should not have to parse either.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return web.json_response(
            {"error": exc.reason if exc.text is None else exc.text},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() != "content-type"},
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)
