"""What a set of PushEvents must produce, by DESIGN.md's "who gets what" rules.

Used by the end-to-end tests for exact counts and by the demo for its summary.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent


@dataclass
class Expected:
    inbox: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    pushed: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    offline: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))

    @property
    def inbox_total(self) -> int:
        return sum(len(v) for v in self.inbox.values())

    @property
    def pushed_total(self) -> int:
        return sum(len(v) for v in self.pushed.values())

    @property
    def offline_total(self) -> int:
        return sum(len(v) for v in self.offline.values())


def expected(events: list[PushEvent], members: dict[str, list[str]], online: set[str]) -> Expected:
    out = Expected()
    for e in events:
        if e.to_usernames:
            recipients = list(e.to_usernames)
        elif e.to_username:
            recipients = [e.to_username]
        else:
            recipients = members.get(e.session_id, [])
        store = ({e.from_username, *recipients} - set(e.exclude_usernames)) - {""}
        if not e.push_only:
            for user in store:
                out.inbox[user].append(e.msg_id)
        if not e.persist_only:
            for user in store - {e.from_username}:
                if user in online:
                    out.pushed[user].append(e.msg_id)
                else:
                    out.offline[e.msg_id].add(user)
    return out


def received(sims: list[GatewaySimulator]) -> dict[str, Counter[int]]:
    out: dict[str, Counter[int]] = defaultdict(Counter)
    for sim in sims:
        for r in sim.recorder.deliveries:
            out[r.user][r.msg_id] += 1
    return out


def pushed_in_order(sims: list[GatewaySimulator]) -> bool:
    """Per (user, session), the gateway saw seq_ids only go up."""
    last: dict[tuple[str, str], int] = {}
    for sim in sims:
        for r in sim.recorder.deliveries:
            key = (r.user, r.session_id)
            if r.seq_id <= last.get(key, 0):
                return False
            last[key] = r.seq_id
    return True
