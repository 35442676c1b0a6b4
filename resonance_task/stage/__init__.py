"""The stage runtime: a stage with a consumer group of its own inside the worker, batched,
its offsets committed only after effect.

Two reasons a stage reads its topic through its own aiokafka consumer instead of a Faust
agent. Isolation: a Faust app is one consumer group, and its conductor stops feeding
every agent when one agent's buffer is full, so a stage that may be slow for long (a
stalled inbox store, a rate-limited push provider) would hold back the whole pipeline.
Cost: Faust hands records over one at a time (~155 us each here, issue 8's profile),
while a fetched batch handled at once costs a few microseconds a record.

- consumer.py   the loop: fetch, hand over, track, checkpoint; restarts and isolation
- offsets.py    which fetched offsets took effect: only a done prefix commits
- flow.py       what is in hand, and when to fetch more (backpressure, keepalive polls)
- checkpoint.py effects acked -> dead letters acked -> commit, and -> offset marks
- resume.py     where a partition taken over resumes (its offset mark), replay of done work
- options.py    a stage's typed options, and the policies some stages pass in
- deferral.py   records not due yet (the task retry topics)

What a SIGKILL makes the next owner do again (pushes sent twice) is what took effect since
the last commit: about one commit round trip of work, unless offset marks
(pipeline/offset_marks.py) keep the done prefix in Redis as it moves (with, for per-record
stages, the records done out of order past it): a successor then starts from the mark and
skips what it names.
"""

from resonance_task.stage.consumer import GroupConsumer, source_record
from resonance_task.stage.deferral import Deferral
from resonance_task.stage.offsets import Offsets, Records
from resonance_task.stage.options import Replay, StageOptions

__all__ = [
    "Deferral",
    "GroupConsumer",
    "Offsets",
    "Records",
    "Replay",
    "StageOptions",
    "source_record",
]
