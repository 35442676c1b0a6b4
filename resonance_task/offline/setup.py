"""The offline push stage the settings configure: providers, HTTP clients, rate limits.

Nothing of it (httpx, JWT signing, HTTP/2) is imported unless a provider is configured:
a worker without offline push is ~15 MB lighter. Providers are built when the stage
starts (or a task first pushes), not when the app is imported: every `faust -A resonance_task.app`
command imports it, and `dlq-list` must not fail on a key file only pushes need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from resonance_task.pipeline.dlq import DeadLetters
from resonance_task.settings import Settings
from resonance_task.stage import StageOptions

if TYPE_CHECKING:
    import httpx

    from resonance_task.offline.processor import OfflinePushConsumer
    from resonance_task.offline.provider import Provider


class ProviderSet(Mapping[str, "Provider"]):
    """The configured providers by name, built on first use, and their HTTP clients."""

    def __init__(
        self,
        names: list[str],
        build: Callable[[], tuple[dict[str, Provider], list[httpx.AsyncClient]]],
    ) -> None:
        self._names = sorted(names)  # what the settings configure: listing builds nothing
        self._build = build
        self._providers: dict[str, Provider] | None = None
        self._clients: list[httpx.AsyncClient] = []

    def open(self) -> dict[str, Provider]:
        """Build them now: a missing key file or setting fails here, loudly."""
        if self._providers is None:
            self._providers, self._clients = self._build()
        return self._providers

    def __getitem__(self, name: str) -> Provider:
        return self.open()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    async def aclose(self) -> None:
        # Built anew if used again: closed clients are never handed out.
        self._providers = None
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()


def configured(s: Settings) -> list[str]:
    """The providers the settings name (empty: no offline push)."""
    wanted = (
        ("apns", s.offline_apns_team_id),
        ("fcm", s.offline_fcm_project_id),
        ("webhook", s.offline_webhook_url),
    )
    return [name for name, setting in wanted if setting]


def offline_stage(
    s: Settings,
    options: StageOptions,
    *,
    dead_letters: DeadLetters,
) -> OfflinePushConsumer | None:
    """The offline push stage, or None when no provider is configured."""
    names = configured(s)
    if not names:
        return None
    from resonance_task.offline.processor import OfflinePushConsumer, OfflinePusher
    from resonance_task.offline.tokens import RedisDeviceTokenStore

    providers = ProviderSet(names, lambda: providers_from(s))
    return OfflinePushConsumer(
        options,
        pusher=OfflinePusher(
            tokens=RedisDeviceTokenStore(
                s.redis_url.get_secret_value(), timeout=s.redis_timeout_seconds
            ),
            providers=providers,
            dead_letters=dead_letters,
            max_attempts=s.offline_max_attempts,
            backoff_min=s.offline_backoff_min_seconds,
            backoff_max=s.offline_backoff_max_seconds,
        ),
        providers=providers,
        dead_letters=dead_letters,  # a record failing alone for good is dead-lettered
    )


def providers_from(s: Settings) -> tuple[dict[str, Provider], list[httpx.AsyncClient]]:
    """Providers by name, and the clients to close at shutdown."""
    import httpx

    from resonance_task.offline.apns import ApnsProvider, http2_client
    from resonance_task.offline.fcm import AccessTokens, FcmProvider, ServiceAccount, StaticToken
    from resonance_task.offline.ratelimit import TokenBucket
    from resonance_task.offline.webhook import WebhookProvider

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
