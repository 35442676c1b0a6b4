"""Prometheus metrics. The `task_*` names are the seeds', kept so existing dashboards work."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STORAGE_DURATION = Histogram(
    "task_storage_process_duration_seconds",
    "Time to write one batch of deliveries to the inbox store",
)
PUSH_ENQUEUE = Counter(
    "task_push_enqueue_total", "Gateway pushes enqueued to a gateway session", ["gateway"]
)
PUSH_ENQUEUE_FAILED = Counter(
    "task_push_enqueue_failed_total",
    "Gateway pushes not enqueued (queue full or gateway down): diverted to offline push",
    ["gateway", "reason"],
)
PUSH_DURATION = Histogram(
    "task_push_process_duration_seconds",
    "Time from a batch's send to the gateway's ack",
)
GATEWAY_QUEUE_DEPTH = Gauge(
    "task_gateway_queue_depth", "Items waiting for a gateway's stream", ["gateway"]
)
GATEWAY_CONNECTED = Gauge(
    "task_gateway_connected_total", "Gateways with an open push stream or channel"
)

EVENTS = Counter("resonance_push_events_total", "Push events fanned out")
DELIVERIES = Counter(
    "resonance_deliveries_total", "Deliveries records produced (one per message and partition)"
)
LARGE_GROUP_JOBS = Counter(
    "resonance_large_group_jobs_total", "Group messages handed to large_group", ["diffusion"]
)
LARGE_GROUP_PAGES = Counter(
    "resonance_large_group_pages_total", "Member pages fanned out by large_group"
)
LARGE_GROUP_RESUMED = Counter(
    "resonance_large_group_resumed_total", "Large-group jobs resumed from a saved cursor"
)
TIMELINE_WRITES = Counter(
    "resonance_timeline_writes_total", "Messages appended to read-diffusion group timelines"
)
RECIPIENTS = Counter("resonance_recipients_total", "Recipients resolved by fan-out")
INBOX_WRITES = Counter(
    "resonance_inbox_writes_total", "Inbox entries written", ["result"]
)  # result: new | duplicate
PUSHED_USERS = Counter("resonance_pushed_users_total", "Users acknowledged by their gateway")
PUSH_REPEATS_DROPPED = Counter(
    "resonance_push_repeats_dropped_total",
    "Users not pushed again: their partition had offered them the same message (a redone fanout)",
)
PUSHES_ALREADY_RECEIVED = Counter(
    "resonance_push_already_received_total",
    "Pushes settled from their gateway's answer to a stream's opening instead of being sent:"
    " it had them from a worker that died (or a stream that broke) before reading the ack",
)
OFFLINE_USERS = Counter("resonance_offline_users_total", "Users sent to offline push", ["reason"])
DEAD_LETTERS = Counter(
    "resonance_dead_letters_total", "Records sent to a dead-letter topic", ["topic", "reason"]
)
PRESENCE_CHANGES = Counter(
    "resonance_presence_changes_total",
    "Presence changes applied to routes (applied), or older than the connection's last (stale)",
    ["result"],
)
GATEWAY_HEARTBEATS_REFUSED = Counter(
    "resonance_gateway_heartbeats_refused_total",
    "Valid heartbeats refused: address_taken (the id is bound to another, live address)",
    ["reason"],
)
FUTURE_TIMESTAMPS = Counter(
    "resonance_future_timestamps_total",
    "Heartbeat and presence timestamps beyond CLOCK_SKEW_SECONDS, clamped",
    ["kind"],
)
CONSUMER_LAG = Gauge(
    "resonance_consumer_lag",
    "Records of a stage's own consumer group not yet committed (high watermark - committed)",
    ["stage", "partition"],
)
MEMBER_STORE_REFUSED = Counter(
    "resonance_member_store_refused_total",
    "Group messages dead-lettered because the member store holds something we cannot page",
    ["reason"],
)
REFUSED_IDS = Counter(
    "resonance_refused_ids_total",
    "Recipients whose user id breaks the id rules (length, characters), dead-lettered",
)
MESSAGE_AGE = Histogram(
    "resonance_message_age_seconds",
    "A message's age (now minus its logic timestamp) when a stage takes it: where time goes",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FANOUT_AGE = MESSAGE_AGE.labels("fanout")
PUSH_AGE = MESSAGE_AGE.labels("push")
GATEWAY_ACK_AGE = MESSAGE_AGE.labels("gateway_ack")
COMMIT_DURATION = Histogram(
    "resonance_commit_duration_seconds",
    "Offset commits of the own-group stages: flushing what they produced, then the commit",
    ["stage", "step"],  # step: flush | commit
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
OFFSETS_SKIPPED = Counter(
    "resonance_offsets_skipped_total",
    "Records a stage did not redo on taking a partition: done before, marked, not committed",
    ["stage"],
)
STAGE_REBALANCES = Counter(
    "resonance_stage_rebalances_total",
    "Partition assignments an own-group stage received (each rebalance it took part in)",
    ["stage"],
)
STAGE_RESTARTS = Counter(
    "resonance_stage_restarts_total",
    "Own-group stages restarted from their committed offsets after a failed batch",
    ["stage"],
)

TASKS_SUBMITTED = Counter(
    "resonance_tasks_submitted_total",
    "Typed tasks accepted (via: api or topic), duplicates by idempotency key included",
    ["task_type", "via"],
)
TASKS_FINISHED = Counter(
    "resonance_tasks_finished_total",
    "Runs of typed tasks by how they ended: succeeded, retrying, dead, cancelled",
    ["task_type", "outcome"],
)
TASK_DURATION = Histogram(
    "resonance_task_duration_seconds",
    "How long a typed task's processor ran",
    ["task_type"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0),
)
TASK_RETRIES = Counter(
    "resonance_task_retries_total", "Typed tasks sent to a retry topic", ["task_type", "stage"]
)
TASKS_RATE_LIMITED = Counter(
    "resonance_tasks_rate_limited_total",
    "Tasks that waited for their type's rate limit (TASK_RATE_LIMITS)",
    ["task_type"],
)
TASKS_SKIPPED = Counter(
    "resonance_tasks_skipped_total",
    "Task records not run because their task had ended or was cancelled",
    ["state"],
)


def totals() -> dict[str, float]:
    """This worker's counters as one flat dict, for /stats."""
    out: dict[str, float] = {}
    for metric in (
        EVENTS,
        DELIVERIES,
        RECIPIENTS,
        INBOX_WRITES,
        PUSHED_USERS,
        OFFLINE_USERS,
        DEAD_LETTERS,
        LARGE_GROUP_JOBS,
        LARGE_GROUP_PAGES,
        LARGE_GROUP_RESUMED,
        TIMELINE_WRITES,
        MEMBER_STORE_REFUSED,
        REFUSED_IDS,
        STAGE_RESTARTS,
    ):
        for family in metric.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def forget_gateway(gateway_id: str) -> None:
    """Drop a gone gateway's labelled series: gateway ids come and go with deployments."""
    for metric in (PUSH_ENQUEUE, PUSH_ENQUEUE_FAILED, GATEWAY_QUEUE_DEPTH):
        metric.remove_by_labels({"gateway": gateway_id})


VIEW_DELAY = Histogram(
    "resonance_view_delay_seconds",
    "A record's age (now minus its timestamp) when this worker's view applies it, one record"
    " in 8; a routes record carries its presence report's timestamp: published -> routable",
    ["view"],
    # Fine below 200 ms, where a healthy view is: the bench reads its p50 and p99 here.
    buckets=(
        *(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125, 0.15, 0.2),
        *(0.3, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30),
    ),
)
FENCE_SECONDS = Histogram(
    "resonance_presence_fence_seconds",
    "How long fan-out waited for its routes view to cover the presence already in Kafka"
    " (at start and after each rebalance)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FENCE_TIMEOUTS = Counter(
    "resonance_presence_fence_timeouts_total",
    "Fan-out routed on after PRESENCE_FENCE_SECONDS without its view covering presence upstream",
)
ERRORS = Counter(
    "resonance_errors_total",
    "Errors a stage or Faust agent met, by what the error policy made of them",
    ["stage", "verdict"],
)
