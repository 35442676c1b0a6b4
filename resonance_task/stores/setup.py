"""The stores the settings choose. PostgreSQL's driver is imported only when it is used."""

from __future__ import annotations

from resonance_task.settings import Settings
from resonance_task.stores.inbox import InboxStore, RedisInboxStore
from resonance_task.stores.members import MemberStore, RedisMemberStore
from resonance_task.stores.timeline import RedisTimelineStore


def member_store(s: Settings) -> MemberStore:
    if s.member_backend == "postgres":
        from resonance_task.stores.postgres import PostgresMemberStore

        return PostgresMemberStore(
            s.postgres_url,
            search_path=s.postgres_schema,
            pool_size=s.postgres_pool_size,
            table=s.member_pg_table,
            session_column=s.member_pg_session_column,
            user_column=s.member_pg_user_column,
            joined_at_column=s.member_pg_joined_at_column,
        )
    return RedisMemberStore(s.redis_url.get_secret_value(), timeout=s.redis_timeout_seconds)


def inbox_store(s: Settings) -> InboxStore:
    if s.inbox_backend == "postgres":
        from resonance_task.stores.postgres import PostgresInboxStore

        return PostgresInboxStore(
            s.postgres_url,
            max_entries=s.inbox_max_entries,
            search_path=s.postgres_schema,
            pool_size=s.postgres_pool_size,
        )
    redis = RedisInboxStore(
        s.inbox_redis,
        max_entries=s.inbox_max_entries,
        message_ttl=s.message_ttl_seconds,
        timeout=s.redis_timeout_seconds,
        cluster=s.inbox_redis_cluster,
    )
    if not s.inbox_archive_enabled:
        return redis
    from resonance_task.stores.archive import ArchivedInboxStore, InboxArchive

    archive = InboxArchive(
        redis,
        s.postgres_url,
        keep_entries=s.inbox_archive_keep_entries,
        after_seconds=s.inbox_archive_after_seconds,
        search_path=s.postgres_schema,
    )
    return ArchivedInboxStore(redis, archive)


def timeline_store(s: Settings) -> RedisTimelineStore:
    return RedisTimelineStore(
        s.inbox_redis,
        max_entries=s.timeline_max_entries,
        message_ttl=s.message_ttl_seconds,
        timeout=s.redis_timeout_seconds,
        cluster=s.inbox_redis_cluster,
    )
