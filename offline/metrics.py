"""Offline push metrics (prometheus-client)."""

from __future__ import annotations

from prometheus_client import Counter

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
