"""The worker's HTTP views (Faust web server), JSON out.

/health, /ready, /metrics, /routes/{user} (from this worker's copy of the routes
changelog: every worker holds every route), /gateways, /large-groups,
/inbox/{user}?after=N&limit=M[&timelines=s1:N1,s2:N2], /stats.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from resonance_task.agents.presence import RoutesStage
from resonance_task.agents.storage import StorageConsumer
from resonance_task.gateway.client import GatewayPool
from resonance_task.pipeline import metrics as pipeline_metrics
from resonance_task.pipeline import retry
from resonance_task.pipeline.fence import Fence
from resonance_task.pipeline.partitioning import partition_for
from resonance_task.pipeline.topic_view import TopicView
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.settings import Settings
from resonance_task.stage import GroupConsumer
from resonance_task.stores.inbox import InboxEntry, InboxStore
from resonance_task.stores.members import MemberStore
from resonance_task.stores.timeline import TimelineStore
from resonance_task.tables import gateways as gateway_rules
from resonance_task.tables import routes as route_rules
from resonance_task.tables.gateways import GatewayInfo
from resonance_task.tables.routes import RoutesView

INBOX_LIMIT_MAX = 1000


def entry_json(entry: InboxEntry) -> dict[str, Any]:
    message = entry.message
    return {
        "cursor": entry.cursor,
        "msg_id": entry.msg_id,
        "session_id": message.session_id if message else None,
        "seq_id": message.seq_id if message else None,
        "message": message_json(message) if message else None,
    }


def message_json(message: PushMessage) -> dict[str, Any]:
    """Proto field names, int64 as JSON numbers (not proto3-JSON strings): what clients sync."""
    out = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for name in ("msg_id", "seq_id", "timestamp"):
        out[name] = int(out[name])
    return out


def parse_timeline_cursors(raw: str) -> dict[str, int]:
    """`s1:N1,s2:N2` -> {s1: N1, s2: N2}: where the client's copy of each timeline ends."""
    cursors: dict[str, int] = {}
    for part in filter(None, raw.split(",")):
        session_id, sep, value = part.rpartition(":")
        if not sep or not session_id or not value.isdigit():
            raise ValueError(f"timelines: expected session_id:cursor, got {part!r}")
        cursors[session_id] = int(value)
    return cursors


async def timelines_of(
    topology: Topology, user: str, cursors: dict[str, int], limit: int
) -> list[dict[str, Any]]:
    """The user's read-diffusion groups, each from the client's cursor on.

    Huge groups keep one timeline instead of an entry in every member's inbox, so the one
    sync call answers both. A member sees what was sent from the time it joined.
    """
    joined = await topology.members.sessions_of(user)
    out = []
    for session_id in sorted(await topology.timeline.existing(joined)):
        after = cursors.get(session_id, 0)
        entries = await topology.timeline.read(session_id, after, limit)
        visible = [
            e for e in entries if e.message is None or e.message.timestamp >= joined[session_id]
        ]
        out.append(
            {
                "session_id": session_id,
                "entries": [entry_json(e) for e in visible],
                # Past what was read, even if hidden: the client must not ask for it again.
                "next": entries[-1].cursor if entries else after,
            }
        )
    return out


def _int_arg(request: Any, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


def readiness(app: Any, topology: Topology) -> tuple[bool, dict[str, Any]]:
    """Ready = every consumer group joined, tables recovered, the whole-topic views current,
    no store retried for longer than READY_STALL_SECONDS.

    A worker may own no partition of some topic (more workers than partitions): it is
    still ready, as a standby. It is not ready while it cannot see every gateway and
    every online user: it would send online users to offline push.
    """
    recovery = app.tables.recovery
    checks = {
        "tables_recovered": recovery.completed.is_set() and not recovery.in_recovery,
        "not_rebalancing": not app.rebalancing,
        **{f"{stage.stage}_joined": stage.joined for stage in topology.stages},
        **{f"{stage.stage}_alive": stage.alive for stage in topology.stages},
        **{f"view_caught_up:{view.topic}": view.caught_up for view in topology.topic_views},
        **{f"view_alive:{view.topic}": view.alive for view in topology.topic_views},
        # The routes view covers the presence already in Kafka (pipeline/fence.py).
        "presence_fence_covered": topology.fence.fresh,
        # A store retried for longer than this: the stage holds its partitions back.
        **{
            f"not_stalled:{what}": seconds <= topology.settings.ready_stall_seconds
            for what, seconds in retry.stalls().items()
        },
    }
    return all(checks.values()), checks


@dataclass(frozen=True)
class Topology:
    """What the views read: handed over by app.py, which builds it."""

    settings: Settings
    routes_stage: RoutesStage
    online_routes: RoutesView
    fence: Fence
    gateways: Mapping[str, GatewayInfo]
    topic_views: Sequence[TopicView]
    inbox: InboxStore
    members: MemberStore
    timeline: TimelineStore
    gateway_pool: GatewayPool
    stages: Sequence[GroupConsumer]
    storage_consumer: StorageConsumer
    large_group_cursors: Any
    offline_consumer: Any = None  # None when no push provider is configured


def gateways_json(topology: Topology) -> list[dict[str, Any]]:
    """Every gateway this worker knows: its heartbeat, status, and this worker's session."""
    at = gateway_rules.clock(
        topology.gateways.values(),
        int(time.time() * 1000),
        int(topology.settings.gateway_timeout_seconds * 1000),
    )
    sessions = topology.gateway_pool.stats()
    return [
        {
            "gateway_id": gid,
            **info,
            "status": gateway_rules.status(info, at),
            "silent_ms": gateway_rules.silent_ms(info, at),
            "session": sessions.get(gid),
        }
        for gid, info in sorted(topology.gateways.items())
    ]


def large_groups_json(topology: Topology) -> dict[str, list[dict[str, Any]]]:
    """This worker's jobs: in progress (resumable from `after`) and recently finished."""
    jobs = [
        {"msg_id": int(key), **cursor}
        for key, cursor in sorted(topology.large_group_cursors.items())
    ]
    return {
        "in_progress": [j for j in jobs if not j["done"]],
        "finished": [j for j in jobs if j["done"]],
    }


def register(app: Any, topology: Topology) -> None:
    @app.page("/health")
    async def health(self: Any, request: Any) -> Any:
        return self.json({"status": "ok", "app_id": topology.settings.app_id})

    @app.page("/ready")
    async def ready(self: Any, request: Any) -> Any:
        ok, checks = readiness(app, topology)
        return self.json({"ready": ok, **checks}, status=200 if ok else 503)

    @app.page("/metrics")
    async def metrics(self: Any, request: Any) -> Any:
        return self.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/routes/{user}")
    async def user_route(self: Any, request: Any, user: str) -> Any:
        # Every worker reads the whole changelog: no hop to the partition's owner. The
        # owner's own copy is ahead of this by the view delay at most.
        route = topology.online_routes.route(user)
        partition = partition_for(user, topology.settings.topic_partitions)
        return self.json(
            {
                "user": user,
                "online_gateways": sorted(route_rules.online_gateways(route)),
                "connections": route_rules.as_json(route),
                # What fan-out on this worker asks: the live gateways it was told of.
                "view_gateways": list(topology.online_routes.get(user)),
                "partition": partition,
                "owned_here": topology.routes_stage.owns(partition),
            }
        )

    @app.page("/gateways")
    async def gateway_list(self: Any, request: Any) -> Any:
        return self.json({"gateways": gateways_json(topology)})

    @app.page("/large-groups")
    async def large_groups(self: Any, request: Any) -> Any:
        return self.json(large_groups_json(topology))

    @app.page("/inbox/{user}")
    async def user_inbox(self: Any, request: Any, user: str) -> Any:
        try:
            after = _int_arg(request, "after", 0, 0, 2**62)
            limit = _int_arg(request, "limit", 100, 1, INBOX_LIMIT_MAX)
            timeline_cursors = parse_timeline_cursors(request.query.get("timelines", ""))
        except ValueError as exc:
            return self.json({"error": str(exc)}, status=400)
        if problem := topology.settings.limits.id_problem(user):
            return self.json({"error": f"user: {problem}"}, status=400)
        # A store that is away answers 503 (web/errors.py).
        entries = await topology.inbox.read(user, after, limit)
        timelines = await timelines_of(topology, user, timeline_cursors, limit)
        return self.json(
            {
                "user": user,
                "entries": [entry_json(e) for e in entries],
                "next": entries[-1].cursor if entries else after,
                "timelines": timelines,
            }
        )

    @app.page("/stats")
    async def stats(self: Any, request: Any) -> Any:
        try:
            assignment = sorted(f"{tp.topic}:{tp.partition}" for tp in app.consumer.assignment())
        except Exception:
            assignment = []
        return self.json(
            {
                "app_id": topology.settings.app_id,
                "assignment": assignment,
                "routes_owned": topology.routes_stage.owned_routes,
                "routes_known": topology.online_routes.known,
                "online_users": len(topology.online_routes),
                "presence_fence": topology.fence.stats(),
                "gateways_known": len(topology.gateways),
                "views": [view.stats() for view in topology.topic_views],
                "stages": {stage.stage: stage.stats() for stage in topology.stages},
                "gateway_sessions": topology.gateway_pool.stats(),
                "storage": topology.storage_consumer.stats(),
                "offline_push": topology.offline_consumer.stats()
                if topology.offline_consumer is not None
                else None,
                "ready": readiness(app, topology)[1],
                "counters": pipeline_metrics.totals(),
            }
        )
