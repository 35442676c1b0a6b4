"""The composition root: `build(settings)` makes the whole worker, and nothing else does.

Nothing here runs at import: the environment is read by `Settings()` in app.py (or by
whoever calls build with settings of their own, as the tests do), and every topic,
table, store, stage, view and web route is made by build, wired by the arguments it
passes. What each service needs (`needs` in build) orders them: each is added to the app
after, and stopped before, what it needs (`Topology.services`).
"""

from __future__ import annotations

import asyncio
import gc
import graphlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import faust
from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
from prometheus_client import REGISTRY

from resonance_task import commands
from resonance_task.agents import fanout, large_group, presence, push, registry, route, storage
from resonance_task.embedded import tansu
from resonance_task.gateway.client import GatewayPool, SessionConfig
from resonance_task.offline.setup import offline_stage
from resonance_task.pipeline import faust_agent, kafka_security, metrics, transport
from resonance_task.pipeline.backlog import OffsetProbe
from resonance_task.pipeline.dlq import DeadLetters, dlq_topic
from resonance_task.pipeline.fence import Fence, Hop
from resonance_task.pipeline.offset_marks import OffsetMarks
from resonance_task.pipeline.topic_view import TopicView
from resonance_task.pipeline.trace import setup_tracing
from resonance_task.pipeline.workers import WorkerDirectory, worker_name
from resonance_task.settings import Settings
from resonance_task.stage import StageOptions
from resonance_task.stage.consumer import GroupConsumer
from resonance_task.stores import setup as stores
from resonance_task.tables import gateways as gateway_rules
from resonance_task.tables import routes as route_rules
from resonance_task.tasks import setup as tasks_setup
from resonance_task.tasks.reports import StatsTable
from resonance_task.tasks.setup import TaskSide
from resonance_task.web import auth, errors, openapi, stats, views
from resonance_task.web import status as status_page
from resonance_task.web import tasks as web_tasks

# Faust's own sensors (its agents' events, table operations, sends, commits, rebalances,
# assignment errors) beside ours, on the one registry /metrics serves: made once a
# process, however many apps are built in it (the registry refuses a name twice).
_faust_metrics: FaustMetrics | None = None


def _sensors() -> FaustMetrics:
    global _faust_metrics
    if _faust_metrics is None:
        _faust_metrics = FaustMetrics.create(REGISTRY, "resonance_faust")
    return _faust_metrics


@dataclass(frozen=True)
class Topology:
    """What build made: the app to run, and its parts by name, for tests and tools."""

    app: faust.App
    settings: Settings
    stages: list[GroupConsumer]
    services: list[Any]  # the app's children, in the order they are added (stopped reversed)
    task_side: TaskSide | None
    inspect: views.Topology  # what the web views see


def faust_config(s: Settings) -> dict[str, Any]:
    transport.register()
    config: dict[str, Any] = {
        "broker": transport.broker_url(s.kafka_broker_url),
        "store": f"{s.table_store}://",
        "topic_partitions": s.topic_partitions,
        # web_bind is the address listened on; web_host names this worker in URLs.
        "web_bind": s.web_host,
        "web_host": s.web_host,
        "web_port": s.web_port,
        "canonical_url": s.canonical_url,
        "topic_replication_factor": s.topic_replication_factor,
        "consumer_auto_offset_reset": "earliest",
        "web_in_thread": False,
        "datadir": s.data_dir,
        "producer_linger": s.producer_linger_ms / 1000,
        # Faust's default is 20 minutes: a send that cannot complete should fail (and the
        # stage retry from its offsets) long before that. Kafka clients' own default.
        "producer_request_timeout": 30.0,
        "producer_max_request_size": s.kafka_max_request_bytes,
        "web_router_enabled": s.web_faust_views,
        "web_tables_enabled": s.web_faust_views,
        "web_stats_enabled": s.web_faust_views,
        "web_graph_enabled": s.web_faust_views,
        # Every agent's crash counted and logged by the error policy, then Faust's handling.
        "Agent": faust_agent.Agent,
    }
    credentials = kafka_security.faust_credentials(s)
    if credentials is not None:
        config["broker_credentials"] = credentials
    middlewares: list[Any] = [errors.json_errors]
    if s.web_auth_token is not None:
        middlewares.append(auth.bearer_middleware(s.web_auth_token.get_secret_value()))
    config["web_application_options"] = {"middlewares": middlewares}
    auth.warn_if_open(s.web_host, protected=s.web_auth_token is not None)
    if s.tansu:
        # DESIGN.md section 6: Tansu's group join waits half the session timeout; its
        # ListOffsets and fetch waits need a transport of our own (embedded/tansu.py).
        tansu.register(s.idle_fetch_max_wait_ms)
        config.update(
            broker=tansu.broker_url(s.kafka_broker_url),
            broker_session_timeout=2.0,
            broker_heartbeat_interval=0.5,
        )
    return config


def kafka_producer_config(s: Settings) -> dict[str, Any]:
    """An aiokafka producer's settings, for a stage that sends record batches itself."""
    return {
        "bootstrap_servers": s.bootstrap_servers,
        "acks": "all",
        "linger_ms": s.producer_linger_ms,
        "max_batch_size": 256 * 1024,
        "max_request_size": s.kafka_max_request_bytes,
        **kafka_security.aiokafka_auth(s),
    }


def kafka_consumer_config(s: Settings, group: str | None, *, hot: bool = False) -> dict[str, Any]:
    """An aiokafka consumer's settings: `hot` for the stages on a message's way to a gateway."""
    config: dict[str, Any] = {
        "bootstrap_servers": s.bootstrap_servers,
        "group_id": group,
        **kafka_security.aiokafka_auth(s),
    }
    if hot:
        config["fetch_max_wait_ms"] = s.hot_fetch_max_wait_ms
    if s.tansu:
        config.update(session_timeout_ms=2000, heartbeat_interval_ms=500)
        config.setdefault("fetch_max_wait_ms", tansu.FETCH_MAX_WAIT_MS)
    return config


def build(settings: Settings) -> Topology:
    app = faust.App(settings.app_id, **faust_config(settings))
    app.monitor = PrometheusMonitor(metrics=_sensors())

    def _topic(name: str) -> Any:
        # internal=True: the worker creates the topic with TOPIC_PARTITIONS if it is missing.
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.topic_partitions,
            internal=True,
        )

    push_events = _topic(settings.topic_push_events)
    presence_updates = _topic(settings.topic_presence)
    gateway_heartbeats = _topic(settings.topic_heartbeats)
    offline_pushes = _topic(settings.topic_offline_pushes)
    deliveries = _topic(settings.topic_name("deliveries"))
    presence_by_user = _topic(settings.topic_name("presence-by-user"))
    gateway_pushes = _topic(settings.topic_name("gateway-pushes"))
    large_group_jobs = _topic(settings.topic_name("large-group-jobs"))
    sources = (
        push_events,
        presence_updates,
        gateway_heartbeats,
        deliveries,
        presence_by_user,
        gateway_pushes,
        large_group_jobs,
        offline_pushes,
    )
    dead_letter_topics = [_topic(dlq_topic(t.get_topic_name())) for t in sources]

    _table_schema: faust.Schema[str, Any] = faust.Schema(
        key_type=str, key_serializer="raw", value_serializer="json"
    )
    # The routes table: written by the routes stage, compacted, co-partitioned by user.
    routes_changelog = app.topic(
        route_rules.changelog_topic(settings.app_id),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
        compacting=True,
        internal=True,
    )
    # Co-partitioned with large-group-jobs: a job's cursor is on the worker running the job.
    large_group_cursors = app.Table(
        large_group.TABLE_NAME, partitions=settings.topic_partitions, schema=_table_schema
    )

    # Every worker's own views of whole topics (not Faust GlobalTables: faust-streaming #283).
    online_routes = route_rules.RoutesView()
    routes_view = TopicView(
        topic=routes_changelog.get_topic_name(),
        apply=online_routes.apply,
        consumer_config=kafka_consumer_config(settings, None, hot=True),
        idle_fetch_wait_ms=settings.idle_fetch_max_wait_ms,
        delay=metrics.VIEW_DELAY.labels("routes"),
    )

    def _forget_gateway(gateway_id: str) -> None:
        metrics.forget_gateway(gateway_id)
        gateway_pool.forget(gateway_id)

    gateways = gateway_rules.Gateways(
        max_skew_ms=settings.clock_skew_ms,
        timeout_ms=int(settings.gateway_timeout_seconds * 1000),
        forget_after_ms=int(settings.gateway_view_lookback_seconds * 1000),
        on_forget=_forget_gateway,
    )
    gateways_view = TopicView(
        topic=gateway_heartbeats.get_topic_name(),
        apply=gateways.apply,
        consumer_config=kafka_consumer_config(settings, None),
        lookback_seconds=settings.gateway_view_lookback_seconds,
        idle_fetch_wait_ms=settings.idle_fetch_max_wait_ms,
        delay=metrics.VIEW_DELAY.labels("gateways"),
    )
    offsets_probe = OffsetProbe(kafka_consumer_config(settings, None))
    presence_group = f"{settings.app_id}-presence"
    routes_group = f"{settings.app_id}-routes"
    presence_fence = Fence(
        hops=[
            Hop(presence_updates.get_topic_name(), presence_group),
            Hop(presence_by_user.get_topic_name(), routes_group),
        ],
        view=routes_view,
        probe=offsets_probe,
        timeout=settings.presence_fence_seconds,
    )

    async def views_caught_up() -> None:
        """Until the gateways view holds what its topic held at start, and the routes view
        what the presence topic held (pipeline/fence.py), routing would send online users to
        offline push: fanout and large_group wait for this before routing."""
        await asyncio.gather(gateways_view.wait_caught_up(), presence_fence.wait_covered())

    members = stores.member_store(settings)
    inbox = stores.inbox_store(settings)
    timeline = stores.timeline_store(settings)

    async def _send_raw(
        topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> object:
        return await app.topic(topic, key_serializer="raw", value_serializer="raw").send(
            key=key, value=value, headers=headers
        )

    def _producer_for(topic: Any) -> transport.SendRecord:
        """Send bytes to `topic` straight through the app's producer; returns the broker's ack.

        The hot path skips Faust's channel machinery (a future, callbacks and sensor hooks per
        record: most of a send's cost). It is the same producer Faust flushes before every
        offset commit, so records sent while handling an event are out before its offset is.
        """
        name = topic.get_topic_name()

        async def send(key: bytes | None, value: bytes, partition: int | None) -> Awaitable[object]:
            return await app.producer.send(name, key, value, partition, None, None)

        return send

    def _save_and_ack(table: Any, key: str, value: Any) -> Awaitable[object]:
        """`table[key] = value`, returning the changelog record's acknowledgement.

        Faust's __setitem__ does the same two steps but drops the future, and flushing the
        whole producer to make one record durable costs every other record's wait too.
        Must run in the event's context: the changelog partition is the event's.
        """
        table.data[key] = value
        fut: Awaitable[object] = table.send_changelog(table.partition_for_key(key), key, value)
        return fut

    outputs = fanout.Outputs(
        deliveries=_producer_for(deliveries),
        gateway_pushes=_producer_for(gateway_pushes),
        offline_pushes=_producer_for(offline_pushes),
        large_group_jobs=_producer_for(large_group_jobs),
    )

    async def _to_presence_by_user(
        value: bytes, partition: int, stamp_ms: int
    ) -> Awaitable[object]:
        name = presence_by_user.get_topic_name()
        return await app.producer.send(name, None, value, partition, stamp_ms / 1000, None)

    dead_letters = DeadLetters(_send_raw)
    router = route.Router(
        routes=online_routes,
        gateways=gateways,
        gateway_timeout_seconds=settings.gateway_timeout_seconds,
        record_max_bytes=settings.record_max_bytes,
    )
    gateway_pool = GatewayPool(SessionConfig.from_settings(settings))

    app.agent(large_group_jobs, name="large_group")(
        large_group.agent(
            large_group.LargeGroups(
                members=members,
                timeline=timeline,
                cursors=large_group_cursors,
                save=lambda key, cursor: _save_and_ack(large_group_cursors, key, cursor),
                router=router,
                outputs=outputs,
                dead_letters=dead_letters,
                partitions=settings.topic_partitions,
                page_size=settings.large_group_page_size,
                max_users_per_delivery=settings.delivery_max_users,
                record_max_bytes=settings.record_max_bytes,
                pages_per_second=settings.large_group_pages_per_second,
                pages_in_flight=settings.large_group_pages_in_flight,
                keep_done_seconds=settings.large_group_cursor_keep_seconds,
                ready=views_caught_up,
                limits=settings.limits,
            )
        )
    )
    app.agent(gateway_heartbeats, name="registry")(registry.agent(dead_letters))

    # Where each stage's done work ends, in Redis between Kafka commits (pipeline/offset_marks.py).
    offset_marks = (
        OffsetMarks(
            settings.redis_url.get_secret_value(),
            settings.app_id,
            timeout=settings.redis_timeout_seconds,
        )
        if settings.offset_marks
        else None
    )

    def stage_options(
        group: str, topics: Sequence[str], batch_max_records: int, *, hot: bool = False
    ) -> StageOptions:
        """An own-group stage's options, with what every one shares: how long an idle fetch
        waits, how often it commits, and where its dead letters go (acknowledged before
        offsets and marks past them are)."""
        return StageOptions(
            topics=tuple(topics),
            consumer_config=kafka_consumer_config(settings, group, hot=hot),
            batch_max_records=batch_max_records,
            idle_fetch_wait_ms=settings.idle_fetch_max_wait_ms,
            commit_interval=settings.commit_interval_ms / 1000,
            letters=dead_letters,
        )

    fanout_consumer = fanout.FanoutConsumer(
        replace(
            stage_options(
                f"{settings.app_id}-fanout",
                [push_events.get_topic_name()],
                settings.fanout_batch_max_records,
                hot=True,
            ),
            max_pending_batches=4,
            marks=offset_marks,
        ),
        fanout=fanout.Fanout(
            members=members,
            router=router,
            outputs=outputs,
            dead_letters=dead_letters,
            partitions=settings.topic_partitions,
            page_size=settings.member_page_size,
            max_users_per_delivery=settings.delivery_max_users,
            record_max_bytes=settings.record_max_bytes,
            diffusion=fanout.Diffusion(
                settings.large_group_min_members, settings.read_diffusion_min_members
            ),
            limits=settings.limits,
        ),
        dead_letters=dead_letters,
        ready=views_caught_up,
        fence=presence_fence,
    )
    presence_stage = presence.PresenceStage(
        replace(
            stage_options(
                presence_group,
                [presence_updates.get_topic_name()],
                settings.presence_batch_max_records,
                hot=True,
            ),
            max_pending_batches=4,
        ),
        send=_to_presence_by_user,
        dead_letters=dead_letters,
        partitions=settings.topic_partitions,
        record_max_bytes=settings.record_max_bytes,
        max_skew_ms=settings.clock_skew_ms,
    )
    routes_stage = presence.RoutesStage(
        replace(
            stage_options(
                routes_group,
                [presence_by_user.get_topic_name()],
                settings.presence_batch_max_records,
                hot=True,
            ),
            max_pending_batches=4,
        ),
        changelog=routes_changelog.get_topic_name(),
        view=online_routes,
        changelog_view=routes_view,
        probe=offsets_probe,
        producer_config=kafka_producer_config(settings),
        dead_letters=dead_letters,
        keep_offline_seconds=settings.route_offline_keep_seconds,
    )
    push_consumer = push.PushConsumer(
        replace(
            stage_options(
                f"{settings.app_id}-push",
                [gateway_pushes.get_topic_name()],
                settings.push_batch_max_records,
                hot=True,
            ),
            max_pending_bytes=settings.push_pending_bytes,
            drain_seconds=settings.push_drain_seconds,
            marks=offset_marks,
        ),
        pool=gateway_pool,
        offline=push.OfflineSink(outputs.offline_pushes),
        dead_letters=dead_letters,
        dedupe_records=settings.push_dedupe_records,
    )
    storage_consumer = storage.StorageConsumer(
        replace(
            stage_options(
                f"{settings.app_id}-storage",
                [deliveries.get_topic_name()],
                settings.storage_batch_max_records,
            ),
            marks=offset_marks,
        ),
        inbox=inbox,
        dead_letters=dead_letters,
        retry_max_seconds=settings.storage_retry_max_seconds,
    )

    # None when no push provider is configured (nothing of offline push is even imported).
    offline_consumer = offline_stage(
        settings,
        stage_options(
            f"{settings.app_id}-offline",
            [offline_pushes.get_topic_name()],
            settings.offline_batch_max_records,
        ),
        dead_letters=dead_letters,
    )
    # Typed tasks (tasks/stages.py): intake, a lane per priority, retry topics, their DLQ.
    task_side = (
        None
        if not settings.tasks_enabled
        else tasks_setup.task_side(
            settings,
            topic=_topic,
            producer_for=_producer_for,
            dead_letters=dead_letters,
            options_for=lambda group, topics, batch: stage_options(group, topics, batch, hot=True),
            offline_pusher=offline_consumer.pusher if offline_consumer is not None else None,
            inbox_archive=getattr(inbox, "archive", None),  # stores/archive.py, when configured
            report_topics={
                "push_events": [push_events.get_topic_name()],
                "presence": [presence_updates.get_topic_name()],
                "heartbeats": [gateway_heartbeats.get_topic_name()],
                "deliveries": [deliveries.get_topic_name()],
                "gateway_pushes": [gateway_pushes.get_topic_name()],
                "offline_pushes": [offline_pushes.get_topic_name()],
                "large_group_jobs": [large_group_jobs.get_topic_name()],
                "dead_letters": [t.get_topic_name() for t in dead_letter_topics],
            },
        )
    )
    # Every worker's copy of the stats_report topic, for GET /api/v1/stats/hourly.
    stats_table: StatsTable | None = None
    stats_view: TopicView | None = None
    if task_side is not None:
        stats_table = StatsTable()
        stats_view = TopicView(
            topic=task_side.stats_topic,
            apply=stats_table.apply,
            consumer_config=kafka_consumer_config(settings, None),
            idle_fetch_wait_ms=settings.idle_fetch_max_wait_ms,
        )
    own_group_stages = [
        stage
        for stage in (
            storage_consumer,
            fanout_consumer,
            push_consumer,
            presence_stage,
            routes_stage,
            offline_consumer,
            *(task_side.stages if task_side else ()),
        )
        if stage is not None
    ]

    # Who is alive and what each holds, for /api/v1/stats/workers.
    worker_directory = WorkerDirectory(
        settings.redis_url.get_secret_value(),
        settings.app_id,
        worker_name(),
        lambda: {
            "web_url": str(app.conf.canonical_url),
            "stages": {stage.stage: stage.stats() for stage in own_group_stages},
            "tasks": task_side.scheduler.stats() if task_side else None,
        },
        timeout=settings.redis_timeout_seconds,
    )

    @app.timer(interval=settings.gateway_timeout_seconds)
    async def _forget_gone_gateways() -> None:
        gateways.forget_gone()

    if task_side is not None and task_side.periodic:
        periodic = task_side.periodic

        @app.timer(interval=periodic.tick_seconds, on_leader=True)
        async def _submit_periodic_tasks() -> None:
            # One worker submits; a task per period runs once however many submit it.
            await periodic.tick()

    # What each service needs running while it runs: it is added after them and stops
    # before them. Fanout feeds push and routes with the views and the fence; push sends to
    # the gateways the view lists; the fence and the routes stage ask the probe and read
    # the routes view; the worker directory describes every stage, so it stops first.
    needs: dict[Any, tuple[Any, ...]] = {
        offsets_probe: (),
        gateways_view: (),
        routes_view: (),
        presence_fence: (offsets_probe, routes_view),
        routes_stage: (offsets_probe, routes_view),
        presence_stage: (),
        storage_consumer: (),
        push_consumer: (gateways_view,),
        fanout_consumer: (
            gateways_view,
            routes_view,
            presence_fence,
            push_consumer,
            storage_consumer,
        ),
    }
    if offline_consumer is not None:
        needs[offline_consumer] = ()
    for stage in task_side.stages if task_side else ():
        needs[stage] = ()
    if stats_view is not None:
        needs[stats_view] = ()
    needs[worker_directory] = tuple(own_group_stages)
    services = list(graphlib.TopologicalSorter(needs).static_order())

    @app.task
    async def _start_own_groups() -> None:
        # Spans only in the worker: commands import this module too (pipeline/trace.py).
        setup_tracing(settings.otel_traces_exporter, settings.otel_service_name)
        # Topics only our own consumers read are not declared by Faust: create them first.
        for topic in (
            *sources,
            routes_changelog,
            *dead_letter_topics,
            *(task_side.topics if task_side else ()),
        ):
            await topic.maybe_declare()
        # Children of the app, stopped with it, in reverse: each stops before what it needs.
        # Started together, because a consumer's start waits for its group join: what a
        # stage needs before it may act is waited for by the stage (fanout's gate).
        await asyncio.gather(*(app.add_runtime_dependency(service) for service in services))
        # What start-up built (modules, the app, its clients) lives as long as the worker:
        # out of the collector's sight, a full collection no longer walks it each time. Those
        # walks held the event loop 80-165 ms at a time while a worker caught up (gen 2 at
        # 140,000-240,000 objects); 13-43 ms after.
        gc.freeze()

    topology = views.Topology(
        settings=settings,
        routes_stage=routes_stage,
        online_routes=online_routes,
        fence=presence_fence,
        gateways=gateways,
        topic_views=(gateways_view, routes_view),
        inbox=inbox,
        members=members,
        timeline=timeline,
        gateway_pool=gateway_pool,
        stages=own_group_stages,
        storage_consumer=storage_consumer,
        large_group_cursors=large_group_cursors,
        offline_consumer=offline_consumer,
    )
    views.register(app, topology)
    if task_side is not None:
        web_tasks.register(app, task_side, settings.limits)
    stats.register(app, task_side, worker_directory, stats_table)
    status_page.register(
        app, topology, worker_directory, task_side, [t.get_topic_name() for t in dead_letter_topics]
    )
    openapi.register(app, task_side.registry if task_side is not None else None)
    commands.register(app, settings)

    return Topology(
        app=app,
        settings=settings,
        stages=own_group_stages,
        services=services,
        task_side=task_side,
        inspect=topology,
    )
