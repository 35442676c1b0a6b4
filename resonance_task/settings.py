"""The one typed configuration object, read from environment variables (12-factor).

Every field is an environment variable of the same name in upper case; README.md's
"Configuration" table lists them all with their defaults.
"""

from __future__ import annotations

import socket
from functools import cached_property
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from resonance_task.pipeline.limits import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    # Names fixed by DESIGN.md section 4: deploy files and operators' scripts use them.
    kafka_broker_url: str = "kafka://localhost:9092"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    postgres_dsn: SecretStr | None = None
    # Loopback unless told otherwise: views show inboxes. To serve other machines, set
    # WEB_HOST=0.0.0.0 and WEB_AUTH_TOKEN.
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535)
    # How other workers reach this one's views (a table lookup for a user another worker
    # owns is proxied there). Unset: WEB_HOST, or this machine's name when WEB_HOST
    # listens on every interface (0.0.0.0 names no machine to anyone else).
    web_canonical_url: str | None = None
    topic_partitions: int = Field(8, ge=1)
    # Replicas of every topic and changelog the worker creates: 3 on a real cluster.
    topic_replication_factor: int = Field(1, ge=1)
    app_id: str = "resonance-task"

    # "kafka" keeps Kafka's defaults; "tansu" applies the embedded broker's workarounds
    # (DESIGN.md section 6): short session timeouts, one record per producer batch.
    broker_profile: Literal["kafka", "tansu"] = "kafka"
    # Where inboxes and group members live. PostgreSQL uses POSTGRES_DSN, in
    # POSTGRES_SCHEMA; group timelines (read diffusion) stay on Redis either way.
    inbox_backend: Literal["redis", "postgres"] = "redis"
    member_backend: Literal["redis", "postgres"] = "redis"
    postgres_schema: str = "public"
    # The member table another service owns (MEMBER_BACKEND=postgres): its name and
    # columns. With the defaults the worker creates it if missing; a configured table must
    # exist, and the worker refuses to page one that lacks a column.
    member_pg_table: str = "t_group_member"
    member_pg_session_column: str = "session_id"
    member_pg_user_column: str = "username"
    member_pg_joined_at_column: str = "joined_at"
    postgres_pool_size: int = Field(4, ge=1)
    # The inbox store may live on its own Redis; empty means REDIS_URL.
    inbox_redis_url: SecretStr | None = None
    # A Redis Cluster needs one write script call per user (keys of one slot a call).
    inbox_redis_cluster: bool = False
    # Faust's local state directory, where the rocksdb table store keeps its files.
    data_dir: str = "resonance-task-data"
    # Where Faust's table (large-group cursors) lives on a worker: "memory" (a dict,
    # rebuilt from the changelog at every start) or "rocksdb" (on disk in DATA_DIR, off
    # the Python heap; a restart on the same DATA_DIR reads only the changelog's tail).
    table_store: Literal["memory", "rocksdb"] = "memory"

    # Every web view but /health, /ready and /metrics asks for this bearer token.
    web_auth_token: SecretStr | None = None
    # Faust's own /router and /table views (table contents: large-group cursors).
    web_faust_views: bool = False

    topic_push_events: str = "resonance.push.event.v1"
    topic_presence: str = "resonance.presence.v1"
    topic_heartbeats: str = "resonance.gateway.heartbeat.v1"
    topic_offline_pushes: str = "resonance.offline.push.v1"

    # Kafka producer: time to fill a batch; Kafka 4's default. On Tansu, whose CPU goes
    # mostly to produce requests, 5 ms gave the lowest latency at a steady 2,700 1:1
    # messages/s (p50/p99: 2 ms 84/234, 5 ms 64/173, 10 ms 76/231; one run each).
    producer_linger_ms: float = Field(5.0, ge=0)
    # The hot path's consumers (fanout, push, the routes view): how long a fetch may wait
    # for records while records flow; and every own consumer's wait once none came for a
    # second. Kafka answers a
    # fetch as soon as records arrive, so its default (500 ms) costs nothing. Tansu holds
    # every fetch for the whole wait (pipeline/fetch_wait.py); measured there, waits under
    # 20 ms made the tail worse, not better (p99 of one hop at 5,000/s: 35 ms at 20 ms,
    # 88 ms at 5 ms), so its profile waits 20 ms while busy and 50 ms at rest.
    fetch_max_wait_ms: int | None = Field(None, ge=0)
    fetch_idle_max_wait_ms: int | None = Field(None, ge=0)
    # OpenTelemetry traces (pipeline/trace.py), by OpenTelemetry's own variable names:
    # "otlp" exports to OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) over
    # HTTP/protobuf; sampling follows the incoming context (OTEL_TRACES_SAMPLER).
    otel_traces_exporter: Literal["none", "otlp", "console"] = "none"
    otel_service_name: str = "resonance-task"
    # Kafka TLS/SASL (pipeline/kafka_security.py), as Kafka clients name them.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr | None = None
    # The producer's max.request.size (Kafka's default, 1 MiB): keep it at or below the
    # brokers' message.max.bytes. RECORD_MAX_BYTES must leave room for a batch's framing.
    kafka_max_request_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    # The largest record we produce (bytes, after the protobuf encoding): records are
    # split by bytes under it, and a push event larger than it is dead-lettered (too_large).
    record_max_bytes: int = Field(512 * 1024, ge=16 * 1024)

    # What producers may send (pipeline/limits.py); beyond it, the DLQ with the reason.
    content_max_bytes: int = Field(256 * 1024, ge=1024)
    # Explicit recipients fanned out inline; a longer to_usernames is paged by large_group.
    recipients_max: int = Field(1000, ge=1)
    id_max_bytes: int = Field(128, ge=8)

    # Fan-out.
    member_page_size: int = Field(1000, ge=1)
    delivery_max_users: int = Field(5000, ge=1)
    fanout_batch_max_records: int = Field(500, ge=1)
    # How often a stage commits the offsets whose effect is done (in the background). A
    # SIGKILL makes the next owner redo up to this much work: pushes sent twice.
    commit_interval_ms: int = Field(20, ge=1)
    # Stages also mark where their done work ends in Redis (REDIS_URL) as it moves, well
    # before the Kafka commit: a worker taking a partition starts from the later of both.
    offset_marks: bool = True

    # Large groups: from this many members a group message is paged by the large_group
    # agent with a resumable cursor (0: never); from the second threshold it is written
    # once to the group's timeline (read diffusion) and pushed to online members only.
    large_group_min_members: int = Field(2000, ge=0)
    # Members per page, one cursor save each: what a crash may redo. Measured on a 100k
    # group (10% online): 1,000 a page 3.6 s to the last push, 5,000 a page 2.0 s.
    large_group_page_size: int = Field(5000, ge=1)
    # Smooths a huge group's burst for the stages downstream; 0 is as fast as it goes.
    large_group_pages_per_second: float = Field(0.0, ge=0)
    # Pages sent ahead of the saved cursor: a crash redoes at most this many.
    large_group_pages_in_flight: int = Field(1, ge=1)
    large_group_cursor_keep_seconds: float = Field(3600.0, ge=0)
    read_diffusion_min_members: int = Field(50_000, ge=0)
    timeline_max_entries: int = Field(10_000, ge=0)

    # Storage (inbox writes).
    inbox_max_entries: int = Field(5000, ge=0)
    message_ttl_seconds: int = Field(7 * 24 * 3600, ge=60)
    storage_batch_max_records: int = Field(500, ge=1)
    storage_retry_max_seconds: float = Field(5.0, gt=0)
    # /ready turns red while a store call (inbox, members, tokens) has been retrying
    # longer than this: the stage holds its partitions back until the store answers.
    ready_stall_seconds: float = Field(30.0, gt=0)
    redis_timeout_seconds: float = Field(2.0, gt=0)

    # Presence and gateways.
    gateway_timeout_seconds: float = Field(15.0, gt=0)
    # How far ahead of this worker's clock a heartbeat or presence timestamp may be.
    clock_skew_seconds: float = Field(5.0, gt=0)
    route_offline_keep_seconds: float = Field(300.0, ge=0)
    # Presence records (a gateway's batch each) the presence stage takes a fetch, and
    # presence-by-user records the routes stage takes.
    presence_batch_max_records: int = Field(500, ge=1)
    # After a rebalance, how long fan-out waits for its routes view to cover the presence
    # already in Kafka before routing on regardless (counted, logged). The first cover,
    # at start, is waited for however long it takes: the worker is not ready before.
    presence_fence_seconds: float = Field(30.0, gt=0)

    # Push to gateways.
    push_batch_max_items: int = Field(128, ge=1)
    push_batch_linger_ms: float = Field(2.0, ge=0)
    push_window_batches: int = Field(8, ge=1)
    push_queue_max_items: int = Field(10_000, ge=1)
    push_ack_timeout_seconds: float = Field(5.0, gt=0)
    push_connect_timeout_seconds: float = Field(2.0, gt=0)
    push_backoff_min_seconds: float = Field(0.1, gt=0)
    push_backoff_max_seconds: float = Field(5.0, gt=0)
    push_max_attempts: int = Field(3, ge=1)
    # TLS to gateways (gateway/tls.py): on with GATEWAY_TLS; the CA that signed the
    # gateways' certificates (empty: system roots), this worker's certificate and key for
    # mutual TLS, and the name the gateways' certificates carry.
    gateway_tls: bool = False
    gateway_tls_ca_file: str = ""
    gateway_tls_cert_file: str = ""
    gateway_tls_key_file: str = ""
    gateway_tls_server_name: str = ""
    push_drain_seconds: float = Field(10.0, ge=0)
    push_batch_max_records: int = Field(100, ge=1)
    # gateway-pushes records in hand (bytes) while gateways acknowledge them; beyond it
    # the push stage stops fetching. Each gateway's own queue is PUSH_QUEUE_MAX_ITEMS.
    push_pending_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # How many of a gateway-pushes partition's last records the push stage remembers, to
    # send no user a message it was offered already (a fanout redone after a crash writes
    # its pushes again, a few records after the first copies); 0 turns that off.
    push_dedupe_records: int = Field(256, ge=0)

    # Offline push (offline/): a provider is on when its settings are set; the stage runs
    # in its own consumer group when any is. Rates are HTTP requests per second.
    offline_fcm_project_id: str = ""
    offline_fcm_service_account_file: str = ""
    offline_fcm_access_token: SecretStr | None = None
    offline_fcm_base_url: str = "https://fcm.googleapis.com"
    offline_fcm_rate: float = Field(500.0, gt=0)
    offline_apns_team_id: str = ""
    offline_apns_key_id: str = ""
    offline_apns_key_file: str = ""
    offline_apns_topic: str = ""
    offline_apns_base_url: str = "https://api.push.apple.com"
    offline_apns_rate: float = Field(500.0, gt=0)
    offline_webhook_url: str = ""
    offline_webhook_secret: SecretStr | None = None
    offline_webhook_rate: float = Field(50.0, gt=0)
    offline_webhook_batch: int = Field(500, ge=1)
    offline_rate_burst: int = Field(10, ge=1)
    offline_max_attempts: int = Field(5, ge=1)
    offline_backoff_min_seconds: float = Field(0.5, gt=0)
    offline_backoff_max_seconds: float = Field(30.0, gt=0)
    offline_batch_max_records: int = Field(200, ge=1)
    offline_http_timeout_seconds: float = Field(10.0, gt=0)

    # Typed tasks (tasks/): submitted to TOPIC_TASKS or POST /api/v1/tasks. Off: this
    # worker runs no task stage and serves no task API (fan-out-only workers, scaled
    # apart from the task workers; the tests of the message path).
    tasks_enabled: bool = True
    topic_tasks: str = "resonance.task.v1"
    # Tasks running at once on a worker, all priorities together.
    task_concurrency: int = Field(100, ge=1)
    task_max_attempts: int = Field(5, ge=1)  # when a task does not say
    task_timeout_seconds: float = Field(300.0, gt=0)  # when neither task nor processor says
    # One retry topic per delay: a task's k-th retry waits the k-th (the last for later
    # ones), +-20% jitter.
    task_retry_delays_ms: str = "1000,10000,60000"
    task_status_ttl_seconds: float = Field(7 * 24 * 3600, gt=0)
    # Modules imported at start whose @processor functions and classes register
    # (comma-separated), besides the built-ins and installed plugins' entry points.
    task_processor_modules: str = ""
    task_batch_max_records: int = Field(500, ge=1)
    # Each priority lane's records in hand (bytes) while their tasks wait or run.
    task_lane_pending_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    # ... and in number (the intake's too): what waits in hand beyond what keeps the slots
    # busy costs memory and the collector's time, and orders nothing; Kafka holds it.
    task_lane_pending_records: int = Field(1000, ge=1)
    # A new task that would start at once anyway (a slot idle, nothing waiting) is run by
    # the intake itself instead of going through its priority's lane topic first.
    task_intake_starts: bool = True
    # Teams' own topics read as tasks: "team.audit.requests=content_audit,...": each
    # record of the topic becomes a task of that type, its value the payload.
    task_topic_routes: str = ""
    # Tasks a second per task type, for the whole cluster: "content_audit=50,archive=5".
    task_rate_limits: str = ""
    # The content_audit processor (tasks/builtins.py) exists when a moderation endpoint
    # is set; its verdicts go to TOPIC_AUDIT_VERDICTS.
    task_audit_url: str | None = None
    task_audit_timeout_seconds: float = Field(5.0, gt=0)
    topic_audit_verdicts: str = "resonance.audit.verdict.v1"
    # The inbox_archive task (stores/archive.py): a Redis inbox keeps its newest
    # INBOX_ARCHIVE_KEEP_ENTRIES and those younger than INBOX_ARCHIVE_AFTER_SECONDS; the
    # rest moves to PostgreSQL (POSTGRES_DSN), still read by /inbox. The leader submits
    # one every INBOX_ARCHIVE_INTERVAL_SECONDS. Both 0: no archive.
    inbox_archive_keep_entries: int = Field(0, ge=0)
    inbox_archive_after_seconds: float = Field(0.0, ge=0)
    inbox_archive_interval_seconds: float = Field(3600.0, gt=0)
    # The stats_report task: counts of the last period to TOPIC_STATS_HOURLY, submitted
    # by the leader every STATS_REPORT_INTERVAL_SECONDS (0: never).
    stats_report_interval_seconds: float = Field(3600.0, ge=0)
    topic_stats_hourly: str = "resonance.stats.hourly.v1"

    @field_validator("kafka_broker_url")
    @classmethod
    def _broker_has_scheme(cls, value: str) -> str:
        for url in value.split(";"):
            if "://" not in url:
                raise ValueError(f"{url!r}: expected kafka://host:port[;kafka://host:port...]")
        return value

    @model_validator(mode="after")
    def _postgres_has_a_dsn(self) -> Settings:
        if "postgres" in (self.inbox_backend, self.member_backend) and self.postgres_dsn is None:
            raise ValueError("INBOX_BACKEND/MEMBER_BACKEND=postgres needs POSTGRES_DSN")
        return self

    @property
    def canonical_url(self) -> str:
        if self.web_canonical_url:
            return self.web_canonical_url.rstrip("/")
        host = self.web_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"http://{host}:{self.web_port}"

    @property
    def inbox_archive_enabled(self) -> bool:
        return self.inbox_archive_keep_entries > 0 or self.inbox_archive_after_seconds > 0

    @model_validator(mode="after")
    def _archive_fits(self) -> Settings:
        if not self.inbox_archive_enabled:
            return self
        if self.inbox_backend != "redis" or self.postgres_dsn is None:
            raise ValueError("INBOX_ARCHIVE_* moves a Redis inbox to POSTGRES_DSN: set both")
        if 0 < self.inbox_max_entries < self.inbox_archive_keep_entries:
            raise ValueError(
                "INBOX_ARCHIVE_KEEP_ENTRIES must be at most INBOX_MAX_ENTRIES (the hard cap)"
            )
        if self.inbox_archive_after_seconds >= self.message_ttl_seconds:
            raise ValueError(
                "INBOX_ARCHIVE_AFTER_SECONDS must be under MESSAGE_TTL_SECONDS: bodies older"
                " than that are gone from Redis before they could be archived"
            )
        return self

    @model_validator(mode="after")
    def _sizes_fit(self) -> Settings:
        if self.record_max_bytes > self.kafka_max_request_bytes - 16 * 1024:
            raise ValueError(
                "RECORD_MAX_BYTES must stay 16 KiB under KAFKA_MAX_REQUEST_BYTES"
                f" ({self.record_max_bytes} > {self.kafka_max_request_bytes} - 16384)"
            )
        if self.content_max_bytes > self.record_max_bytes // 2:
            raise ValueError("CONTENT_MAX_BYTES must be at most half of RECORD_MAX_BYTES")
        return self

    @cached_property
    def limits(self) -> Limits:
        return Limits(
            content_max_bytes=self.content_max_bytes,
            recipients_max=self.recipients_max,
            id_max_bytes=self.id_max_bytes,
        )

    @cached_property
    def task_retry_delays(self) -> tuple[float, ...]:
        """TASK_RETRY_DELAYS_MS in seconds."""
        return tuple(int(part) / 1000 for part in self.task_retry_delays_ms.split(","))

    @cached_property
    def task_routes(self) -> dict[str, str]:
        """TASK_TOPIC_ROUTES as {topic: task_type}."""
        routes = {}
        for part in filter(None, (p.strip() for p in self.task_topic_routes.split(","))):
            topic, _, task_type = part.partition("=")
            routes[topic.strip()] = task_type.strip()
        return routes

    @field_validator("task_topic_routes")
    @classmethod
    def _routes_parse(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            topic, sep, task_type = part.partition("=")
            if not sep or not topic.strip() or not task_type.strip():
                raise ValueError(f"topic=task_type, comma-separated; got {part!r}")
        return value

    @field_validator("task_rate_limits")
    @classmethod
    def _rate_limits_parse(cls, value: str) -> str:
        from resonance_task.tasks.ratelimit import parse

        parse(value)
        return value

    @field_validator("task_retry_delays_ms")
    @classmethod
    def _delays_are_ms(cls, value: str) -> str:
        parts = value.split(",")
        if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"comma-separated milliseconds, each > 0; got {value!r}")
        return ",".join(p.strip() for p in parts)

    @cached_property
    def bootstrap_servers(self) -> list[str]:
        """The broker URL as aiokafka wants it: host:port without the scheme."""
        return [url.split("://", 1)[1].rstrip("/") for url in self.kafka_broker_url.split(";")]

    @property
    def inbox_redis(self) -> str:
        return (self.inbox_redis_url or self.redis_url).get_secret_value()

    @property
    def postgres_url(self) -> str:
        if self.postgres_dsn is None:
            raise ValueError("POSTGRES_DSN is not set")
        return self.postgres_dsn.get_secret_value()

    @property
    def clock_skew_ms(self) -> int:
        return int(self.clock_skew_seconds * 1000)

    @property
    def tansu(self) -> bool:
        return self.broker_profile == "tansu"

    @property
    def hot_fetch_max_wait_ms(self) -> int:
        if self.fetch_max_wait_ms is not None:
            return self.fetch_max_wait_ms
        return 20 if self.tansu else 500  # 20: as Faust's own consumer waits on Tansu

    @property
    def idle_fetch_max_wait_ms(self) -> int:
        if self.fetch_idle_max_wait_ms is not None:
            return self.fetch_idle_max_wait_ms
        return 50 if self.tansu else self.hot_fetch_max_wait_ms

    @property
    def gateway_view_lookback_seconds(self) -> float:
        """How far back a starting worker reads heartbeats: older ones mean "down" anyway."""
        return max(60.0, 4 * self.gateway_timeout_seconds)

    def topic_name(self, internal: str) -> str:
        """Name of an internal topic: prefixed with APP_ID, as Faust names its own."""
        return f"{self.app_id}-{internal}"
