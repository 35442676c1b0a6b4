"""Errors as JSON: `{"error": "..."}` with the right status, for every request.

aiohttp answers its own refusals (no such path, method not allowed, a request line too
long) with plain text, and an exception in a view with an HTML page; clients of a JSON
API should not have to parse either. A store that is away is a 503 with Retry-After,
whichever view met it.
"""

from __future__ import annotations

import logging

from aiohttp import web
from pydantic import ValidationError

from resonance_task.errors import is_transient
from resonance_task.web.auth import Handler
from resonance_task.web.models import error_of

log = logging.getLogger(__name__)


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
    except ValidationError as exc:
        # A query or body the API's models refused (web/models.py): 400, naming the field.
        return web.json_response(error_of(exc).model_dump(), status=400)
    except Exception as exc:
        if is_transient(exc):
            # A store is away (down, paused, timing out): try again, not a server bug.
            return web.json_response(
                {"error": f"a store is unavailable: {type(exc).__name__}"},
                status=503,
                headers={"Retry-After": "1"},
            )
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)
