"""What the agents write, captured (deliveries, gateway pushes, offline, jobs, DLQ), and the
views they route with, made from plain dicts: fakes the agent tests share."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from types import SimpleNamespace

from resonance_task.agents.fanout import Outputs
from resonance_task.agents.route import Router
from resonance_task.offline.records import decode as decode_offline
from resonance_task.pipeline.dlq import DeadLetters
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import (
    Delivery,
    DeliveryBatch,
    GatewayPushBatch,
    LargeGroupJob,
    OfflinePush,
)
from resonance_task.tables.gateways import Gateways
from resonance_task.tables.routes import RoutesView


def now_ms() -> int:
    return int(time.time() * 1000)


def online(routes: dict[str, list[str]]) -> RoutesView:
    """The routes view as a worker builds it from the changelog: user -> live gateways."""
    view = RoutesView()
    for user, gateway_ids in routes.items():
        route = {
            f"c{i}": {"gw": g, "ts": 1, "on": True, "pf": ""} for i, g in enumerate(gateway_ids)
        }
        view.apply(
            SimpleNamespace(
                key=json.dumps(user).encode(), value=json.dumps(route).encode(), partition=0
            )
        )
    return view


def gateways(*up: str, silent: tuple[str, ...] = (), draining: tuple[str, ...] = ()) -> Gateways:
    view = Gateways()
    t = now_ms()
    for gateway_id, ts, drain in (
        *((g, t, False) for g in up),
        *((g, t - 120_000, False) for g in silent),
        *((g, t, True) for g in draining),
    ):
        beat = GatewayHeartbeat(gateway_id=gateway_id, address=f"{gateway_id}:1", timestamp=ts)
        beat.draining = drain
        view.apply(SimpleNamespace(value=beat.SerializeToString(), timestamp=ts))
    return view


def router(routes: dict[str, list[str]] | None = None, *up: str, **kw: tuple[str, ...]) -> Router:
    return Router(
        routes=online(routes or {}), gateways=gateways(*up, **kw), gateway_timeout_seconds=5
    )


class Sink:
    """Every record a stage produced, decoded, with an already-acknowledged future each."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[int | None, DeliveryBatch]] = []
        self.pushes: list[tuple[bytes | None, GatewayPushBatch]] = []
        self.offline: list[OfflinePush] = []
        self.jobs: list[tuple[bytes | None, LargeGroupJob]] = []
        self.dead: list[tuple[str, dict[str, bytes]]] = []
        self.dead_values: list[bytes | None] = []

    @staticmethod
    def _acked() -> Awaitable[object]:
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def outputs(self) -> Outputs:
        async def deliveries(key: bytes | None, value: bytes, p: int | None) -> Awaitable[object]:
            self.deliveries.append((p, DeliveryBatch.FromString(value)))
            return self._acked()

        async def pushes(key: bytes | None, value: bytes, p: int | None) -> Awaitable[object]:
            self.pushes.append((key, GatewayPushBatch.FromString(value)))
            return self._acked()

        async def offline(key: bytes | None, value: bytes, p: int | None) -> Awaitable[object]:
            self.offline += decode_offline(value)
            return self._acked()

        async def jobs(key: bytes | None, value: bytes, p: int | None) -> Awaitable[object]:
            self.jobs.append((key, LargeGroupJob.FromString(value)))
            return self._acked()

        return Outputs(deliveries, pushes, offline, jobs)

    def dead_letters(self) -> DeadLetters:
        async def send(
            topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
        ) -> None:
            self.dead.append((topic, dict(headers)))
            self.dead_values.append(value)

        return DeadLetters(send)

    def delivered(self) -> list[Delivery]:
        return [d for _, batch in self.deliveries for d in batch.deliveries]

    def stored(self) -> list[str]:
        """Every inbox write, sorted."""
        return sorted(u for d in self.delivered() for u in d.users)

    def pushed(self) -> dict[str, list[str]]:
        """gateway_id -> users pushed, in order."""
        out: dict[str, list[str]] = {}
        for _, batch in self.pushes:
            for push in batch.pushes:
                out.setdefault(batch.gateway_id, []).extend(push.users)
        return out

    def offline_users(self) -> list[str]:
        return sorted(u for o in self.offline for u in o.users)
