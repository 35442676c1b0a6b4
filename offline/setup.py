"""The providers that the settings configure, each with its HTTP client and rate limit."""

from __future__ import annotations

from pathlib import Path

import httpx

from offline.apns import ApnsProvider, http2_client
from offline.fcm import AccessTokens, FcmProvider, ServiceAccount, StaticToken
from offline.provider import Provider
from offline.ratelimit import TokenBucket
from offline.webhook import WebhookProvider
from settings import Settings


def providers_from(s: Settings) -> tuple[dict[str, Provider], list[httpx.AsyncClient]]:
    """Providers by name, and the clients to close at shutdown."""
    providers: dict[str, Provider] = {}
    clients: list[httpx.AsyncClient] = []

    def limiter(rate: float) -> TokenBucket:
        return TokenBucket(rate, s.offline_rate_burst)

    if s.offline_fcm_project_id:
        client = httpx.AsyncClient(http2=True, timeout=s.offline_http_timeout_seconds)
        clients.append(client)
        credentials: AccessTokens
        if s.offline_fcm_access_token is not None:
            credentials = StaticToken(s.offline_fcm_access_token.get_secret_value())
        elif s.offline_fcm_service_account_file:
            credentials = ServiceAccount.from_file(s.offline_fcm_service_account_file, client)
        else:
            raise ValueError(
                "OFFLINE_FCM_PROJECT_ID needs OFFLINE_FCM_SERVICE_ACCOUNT_FILE or "
                "OFFLINE_FCM_ACCESS_TOKEN"
            )
        providers["fcm"] = FcmProvider(
            client=client,
            project_id=s.offline_fcm_project_id,
            credentials=credentials,
            base_url=s.offline_fcm_base_url,
            limiter=limiter(s.offline_fcm_rate),
        )
    if s.offline_apns_team_id:
        missing = [
            name
            for name, value in (
                ("OFFLINE_APNS_KEY_ID", s.offline_apns_key_id),
                ("OFFLINE_APNS_KEY_FILE", s.offline_apns_key_file),
                ("OFFLINE_APNS_TOPIC", s.offline_apns_topic),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"OFFLINE_APNS_TEAM_ID needs {', '.join(missing)}")
        client = http2_client(s.offline_http_timeout_seconds)
        clients.append(client)
        providers["apns"] = ApnsProvider(
            client=client,
            team_id=s.offline_apns_team_id,
            key_id=s.offline_apns_key_id,
            private_key=Path(s.offline_apns_key_file).read_text(),
            topic=s.offline_apns_topic,
            base_url=s.offline_apns_base_url,
            limiter=limiter(s.offline_apns_rate),
        )
    if s.offline_webhook_url:
        client = httpx.AsyncClient(timeout=s.offline_http_timeout_seconds)
        clients.append(client)
        providers["webhook"] = WebhookProvider(
            client=client,
            url=s.offline_webhook_url,
            secret=s.offline_webhook_secret.get_secret_value() if s.offline_webhook_secret else "",
            limiter=limiter(s.offline_webhook_rate),
            max_batch=s.offline_webhook_batch,
        )
    return providers, clients
