"""A local stand-in for the push providers: FCM v1, APNs, a webhook and an OAuth token
endpoint, on one real HTTP server (HTTP/1.1 and HTTP/2 cleartext, by hypercorn).

It records every request and answers as the real service would, including for device
tokens marked invalid; failures can be injected. Used by the tests and the demo.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from resonance_task.embedded.broker import free_port
from resonance_task.offline.webhook import SIGNATURE_HEADER, sign

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() at receipt
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # JSON, or the form fields of a token request
    http_version: str


@dataclass
class ProviderServer:
    webhook_secret: str = ""
    invalid_tokens: set[str] = field(default_factory=set)
    requests: list[Received] = field(default_factory=list)
    _failures: list[tuple[str, int, float | None]] = field(default_factory=list)
    _issued: set[str] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(
        self, count: int, status: int = 503, retry_after: float | None = None, path_prefix: str = ""
    ) -> None:
        """The next `count` push requests (under `path_prefix`) are answered with `status`."""
        self._failures += [(path_prefix, status, retry_after)] * count

    def accept_access_token(self, token: str) -> None:
        """Let FCM requests in with `token`, as for a deployment given a static one."""
        self._issued.add(token)

    def pushes(self, path_prefix: str) -> list[Received]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    async def start(self) -> ProviderServer:
        self.port = free_port()
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.errorlog = None
        self._task = asyncio.create_task(
            serve(self._app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]
        )
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return self
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("the provider server did not start")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> ProviderServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        if path == "/token":
            form = dict(pair.split("=", 1) for pair in raw.decode().split("&") if "=" in pair)
            self._record(scope, headers, form)
            token = f"access-{len(self._issued) + 1}"
            self._issued.add(token)
            await _answer(send, 200, {"access_token": token, "expires_in": 3600})
            return
        body = json.loads(raw or b"null")
        self._record(scope, headers, body)
        injected = next((f for f in self._failures if path.startswith(f[0])), None)
        if injected is not None:
            self._failures.remove(injected)
            _, status, retry_after = injected
            extra = {"retry-after": str(retry_after)} if retry_after is not None else {}
            await _answer(send, status, {"error": "injected"}, extra)
            return
        status, answer = self._route(path, headers, raw, body)
        await _answer(send, status, answer)

    def _record(self, scope: Scope, headers: dict[str, str], body: Any) -> None:
        self.requests.append(
            Received(
                time.monotonic(),
                scope["method"],
                scope["path"],
                headers,
                body,
                scope.get("http_version", ""),
            )
        )

    def _route(self, path: str, headers: dict[str, str], raw: bytes, body: Any) -> tuple[int, Any]:
        auth = headers.get("authorization", "")
        if path.startswith("/v1/projects/"):  # FCM HTTP v1
            if auth.removeprefix("Bearer ") not in self._issued:
                return 401, {"error": {"status": "UNAUTHENTICATED"}}
            if body["message"]["token"] in self.invalid_tokens:
                return 404, {
                    "error": {
                        "status": "NOT_FOUND",
                        "message": "Requested entity was not found.",
                        "details": [{"errorCode": "UNREGISTERED"}],
                    }
                }
            return 200, {"name": f"{path.split(':')[0]}/{len(self.requests)}"}
        if path.startswith("/3/device/"):  # APNs
            if not auth.startswith("bearer "):
                return 403, {"reason": "MissingProviderToken"}
            if path.removeprefix("/3/device/") in self.invalid_tokens:
                return 410, {"reason": "Unregistered"}
            return 200, {}
        if path == "/webhook":
            if self.webhook_secret and headers.get(SIGNATURE_HEADER.lower()) != sign(
                self.webhook_secret, raw
            ):
                return 401, {"error": "bad signature"}
            tokens = {n["token"] for n in body["notifications"]}
            return 200, {"invalid_tokens": sorted(tokens & self.invalid_tokens)}
        return 404, {"error": "no such endpoint"}


async def _answer(
    send: Send, status: int, body: Any, headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})
