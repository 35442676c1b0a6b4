"""The load generator, in a process of its own so its CPU is measured apart.

    python -m bench.loadgen --bootstrap H:P --topic T --users PREFIX:N --count C
                            [--seed S] [--rate R] [--group SESSION --members PREFIX:N]

Publishes PushEvents as a logic service would (key = session_id, `timestamp` = the time
of the send, so a gateway's receipt time minus it is the end-to-end latency), either as
fast as it can (a burst) or at `--rate` events per second, and prints one JSON line. It
builds its events and connects first, prints `ready` and sends once it reads a line on
stdin, so its start-up is not measured.
1:1 conversations are drawn by `one_to_one_pairs`, so the caller can count what to
expect without seeing the events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from aiokafka import AIOKafkaProducer

from resonance_task.commands.traffic import group_chat, single_chat


def users(spec: str) -> list[str]:
    """`prefix:count` -> prefix-u00000, prefix-u00001, ..."""
    prefix, count = spec.rsplit(":", 1)
    return [f"{prefix}-u{i:05d}" for i in range(int(count))]


def one_to_one_pairs(everyone: list[str], count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        sender, recipient = rng.sample(everyone, 2)
        pairs.append((sender, recipient))
    return pairs


async def publish(args: argparse.Namespace) -> dict[str, float]:
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, linger_ms=args.linger_ms, max_batch_size=256 * 1024
    )
    await producer.start()
    if args.group:
        senders = users(args.members)
        events = [
            group_chat(senders[i % len(senders)], args.group, i + 1, f"group message {i}")
            for i in range(args.count)
        ]
    else:
        pairs = one_to_one_pairs(users(args.users), args.count, args.seed)
        seqs: dict[tuple[str, str], int] = {}
        events = []
        for i, (sender, recipient) in enumerate(pairs):
            conversation = (min(sender, recipient), max(sender, recipient))
            seqs[conversation] = seqs.get(conversation, 0) + 1
            body = f"bench message {i} " + "x" * 100
            events.append(single_chat(sender, recipient, seqs[conversation], body))
    interval = 1.0 / args.rate if args.rate else 0.0
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    started = time.monotonic()
    for i, event in enumerate(events):
        if interval:
            delay = started + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        event.timestamp = int(time.time() * 1000)
        await producer.send(args.topic, event.SerializeToString(), key=event.session_id.encode())
    await producer.flush()
    seconds = time.monotonic() - started
    await producer.stop()
    return {"sent": len(events), "seconds": round(seconds, 3), "rate": round(len(events) / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--users", default="")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: a burst")
    parser.add_argument("--linger-ms", type=float, default=5.0)
    parser.add_argument("--group", default="", help="send to this group session instead")
    parser.add_argument("--members", default="", help="the group's senders, PREFIX:N")
    print(json.dumps(asyncio.run(publish(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
