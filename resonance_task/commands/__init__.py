"""Developer tools as Faust CLI commands on the same app (`faust -A resonance_task.app <command>`).

gateway-sim   a simulated gateway: real gRPC server, presence, heartbeats, records pushes
send          publish one PushEvent
loadgen       publish a mix of 1:1 and group messages
dlq-list      show what a dead-letter topic holds and why
dlq-replay    send dead-lettered records back to their source topic
task-dlq-replay  dead tasks back into the first retry stage (`--dry-run`, `--task-id`)
"""

from __future__ import annotations

from typing import Any

from resonance_task.settings import Settings


def register(app: Any, settings: Settings) -> None:
    from resonance_task.commands import dlq, gateway_sim, tasks, traffic

    gateway_sim.register(app, settings)
    traffic.register(app, settings)
    dlq.register(app, settings)
    tasks.register(app, settings)
