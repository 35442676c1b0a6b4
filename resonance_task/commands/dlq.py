"""`dlq-list` and `dlq-replay`: look into a dead-letter topic, send records back.

They need Kafka and nothing else, so they also run without the app (which builds stores
and push providers at import, and fails on, say, a missing APNs key file):

    python -m resonance_task.commands.dlq list   --topic resonance.mq.v1.push   [--limit N]
    python -m resonance_task.commands.dlq replay --topic resonance.mq.v1.push
                                  [--reason R] [--dry-run]
                                  [--partition P --from-offset A --to-offset B]

A replay reads the dead letters as the consumer group `<APP_ID>-dlq-replay[-<reason>]`
and commits what it has sent back, so running it twice sends nothing twice (a run for
one reason and a run for all are separate groups: the latter also sends what the former
did; two runs of one group at once both send what neither has committed; and Kafka
forgets a group's offsets after offsets.retention.minutes, 7 days by default, without
a member); `--from-offset` and
`--to-offset` (inclusive, with `--partition`) pick a range by hand and commit nothing.
`--dry-run` lists what would be sent. Progress goes to stderr (commands/progress.py); the
last line on stdout is the JSON outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from resonance_task.commands.progress import progress
from resonance_task.pipeline.dlq import H_ERROR, H_REASON, H_TOPIC, dlq_topic
from resonance_task.pipeline.kafka_security import aiokafka_auth
from resonance_task.settings import Settings


async def read_all(
    bootstrap_servers: list[str] | str, topic: str, limit: int, **config: Any
) -> list[Any]:
    """Every record of `topic` from the start, without joining a consumer group."""
    # Fetches answer within 50 ms: "quiet" below means several empty fetches in a row,
    # not one fetch still held by the broker (aiokafka's default wait, 500 ms, outlasts
    # a 300 ms poll: two polls could end empty-handed with records on their way).
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
        **config,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        # Read until the topic has been quiet for a moment rather than up to end_offsets():
        # Tansu's ListOffsets(latest) undercounts topics written in multi-record batches.
        quiet = 0
        while len(records) < limit and quiet < 3:
            batch = await consumer.getmany(timeout_ms=300, max_records=limit - len(records))
            quiet = 0 if batch else quiet + 1
            for rs in batch.values():
                records.extend(rs)
        return records[:limit]
    finally:
        # A group-less aiokafka consumer stopped before its background task ever ran
        # (a topic that does not exist returns at once) raises CancelledError from stop().
        await asyncio.sleep(0)
        await consumer.stop()


def describe(record: Any) -> dict[str, Any]:
    headers = {k: v.decode(errors="replace") for k, v in record.headers or ()}
    return {
        "partition": record.partition,
        "offset": record.offset,
        "reason": headers.get(H_REASON),
        "error": headers.get(H_ERROR),
        "source": headers.get(H_TOPIC),
        "bytes": len(record.value or b""),
    }


async def replay(
    settings: Settings,
    topic: str,
    *,
    limit: int,
    reason: str = "",
    dry_run: bool = False,
    partition: int | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
) -> dict[str, Any]:
    """Send `topic`'s dead letters back to it; what was sent (or, dry, would be)."""
    by_hand = from_offset is not None or to_offset is not None
    if by_hand and partition is None:
        raise ValueError("--from-offset/--to-offset need --partition")
    dlq, auth = dlq_topic(topic), aiokafka_auth(settings)
    # A group per reason: a run for one reason leaves the others' records for theirs.
    group = f"{settings.app_id}-dlq-replay" + (f"-{reason}" if reason else "")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        # A dry run reads as the group too (from where a replay would start), and
        # commits nothing.
        group_id=None if by_hand else group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        **auth,
    )
    producer = (
        None
        if dry_run
        # Every replica has it before the group commits past it.
        else AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", **auth)
    )
    await consumer.start()
    if producer is not None:
        await producer.start()
    sent, skipped, seen, matched = 0, 0, 0, []
    bar = progress()
    task = bar.add_task("would replay" if dry_run else "replayed", total=None)
    bar.start()
    try:
        tps = [
            TopicPartition(dlq, p)
            for p in sorted(consumer.partitions_for_topic(dlq) or ())
            if partition is None or p == partition
        ]
        if not tps:
            return {"replayed": 0, "to": topic, "dlq": dlq, "note": "no such partition or topic"}
        consumer.assign(tps)
        if by_hand:
            for tp in tps:
                consumer.seek(tp, from_offset or 0)
        quiet, past = 0, False
        while seen < limit and quiet < 3 and not past:
            batch = await consumer.getmany(timeout_ms=300, max_records=min(500, limit - seen))
            quiet = 0 if batch else quiet + 1
            acks = []
            for records in batch.values():
                for record in records:
                    if to_offset is not None and record.offset > to_offset:
                        past = True  # one partition: the range is done
                        break
                    seen += 1
                    if reason and describe(record)["reason"] != reason:
                        skipped += 1
                        continue
                    if producer is None:
                        matched.append(describe(record))
                    else:
                        acks.append(await producer.send(topic, record.value, key=record.key))
                    sent += 1
                    bar.update(task, completed=sent)
            if acks:
                await asyncio.gather(*acks)
            if batch and not (by_hand or dry_run):
                await consumer.commit()  # only once what it covers is acknowledged
    finally:
        bar.stop()
        await asyncio.sleep(0)
        await consumer.stop()
        if producer is not None:
            await producer.stop()
    outcome: dict[str, Any] = {
        "replayed": 0 if dry_run else sent,
        "to": topic,
        "dlq": dlq,
        "skipped_by_reason": skipped,
    }
    if dry_run:
        outcome.update(would_replay=sent, records=matched[:100])
    return outcome


def register(app: Any, settings: Settings) -> None:
    from faust.cli import option

    @app.command(
        option("--topic", default=settings.topic_push_events, help="source topic"),
        option("--limit", type=int, default=100),
    )
    async def dlq_list(self: Any, topic: str, limit: int) -> None:
        """List what `<topic>.dlq` holds, with the reason of each record."""
        await _list(settings, topic, limit)

    @app.command(
        option("--topic", default=settings.topic_push_events, help="source topic"),
        option("--limit", type=int, default=1_000_000),
        option("--reason", default="", help="only records dead-lettered for this reason"),
        option("--dry-run", is_flag=True, help="list what would be sent, send nothing"),
        option("--partition", type=int, default=None, help="with an offset range"),
        option("--from-offset", type=int, default=None, help="first offset (commits nothing)"),
        option("--to-offset", type=int, default=None, help="last offset, inclusive"),
    )
    async def dlq_replay(self: Any, topic: str, limit: int, **chosen: Any) -> None:
        """Send dead-lettered records back to their source topic (after a fix), once."""
        print(json.dumps(await replay(settings, topic, limit=limit, **chosen)))


async def _list(settings: Settings, topic: str, limit: int) -> None:
    records = await read_all(
        settings.bootstrap_servers, dlq_topic(topic), limit, **aiokafka_auth(settings)
    )
    for record in records:
        print(json.dumps(describe(record)))


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m resonance_task.commands.dlq", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="what <topic>.dlq holds, with reasons")
    again = sub.add_parser("replay", help="dead letters back to their topic, once")
    for each in (listing, again):
        each.add_argument("--topic", default=settings.topic_push_events)
    listing.add_argument("--limit", type=int, default=100)
    again.add_argument("--limit", type=int, default=1_000_000)
    again.add_argument("--reason", default="")
    again.add_argument("--dry-run", action="store_true")
    again.add_argument("--partition", type=int)
    again.add_argument("--from-offset", type=int)
    again.add_argument("--to-offset", type=int)
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.command == "list":
        asyncio.run(_list(settings, args.topic, args.limit))
        return 0
    try:
        outcome = asyncio.run(
            replay(
                settings,
                args.topic,
                limit=args.limit,
                reason=args.reason,
                dry_run=args.dry_run,
                partition=args.partition,
                from_offset=args.from_offset,
                to_offset=args.to_offset,
            )
        )
    except ValueError as exc:
        parser.error(str(exc))
    outcome["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
