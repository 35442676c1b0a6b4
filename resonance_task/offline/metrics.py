"""Offline push metrics (prometheus-client)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

NOTIFICATIONS = Counter(
    "resonance_offline_notifications_total",
    "Notification attempts at push providers, by outcome",
    ["provider", "result"],
)
SKIPPED = Counter(
    "resonance_offline_skipped_total",
    "Offline users or devices not notified: no registered device, or no such provider",
    ["reason"],
)
PROVIDER_DURATION = Histogram(
    "resonance_offline_provider_duration_seconds",
    "One send to a push provider (a batch of notifications), by how it ended: ok or raised",
    ["provider", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
