"""Resonance Task: the Faust app and its whole topology, on one screen.

    push-events --[fanout]--+--> deliveries -------[storage]--> inboxes
        |   (own group)     +--> gateway-pushes ---[push]-----> gateways (gRPC streams)
        |                   +--> offline-pushes    (own group)   |
        |                             ^                          v
        |                             +------------------- offline-pushes
        +--> large-group-jobs --[large_group]--> deliveries, gateway-pushes, offline-pushes
               (cursor table; read diffusion: group timelines)
    presence --[presence]--> presence-by-user --[routes]--> routes changelog (compacted)
    routes changelog -------> routes view          (every worker: fanout routes with it)
    gateway-heartbeats -----> gateways view        (every worker; [registry] dead-letters)
    task topic --[task intake]--> lanes high|normal|low --[task lanes]--> processors
                                    ^                              | failed: retry topics,
                                    +---------[task retry k]-------+ then the task DLQ

fanout, push, storage, presence, routes and the task stages read their topics in consumer
groups of their own, a fetched batch at a time (stage/); large_group
and registry are Faust agents, large_group with the cursor table it writes. Run it with
`faust -A resonance_task.app worker`; scale it with workers and Kafka partitions.
"""

from __future__ import annotations

from resonance_task.settings import Settings
from resonance_task.topology import build

# The environment is read here, once: build() itself reads nothing but its settings.
topology = build(Settings())
app = topology.app
