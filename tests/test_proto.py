"""The generated code in proto/ matches the .proto files (run tools/gen_proto.py if not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_wire_contract_field_numbers() -> None:
    from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushBatchAck, PushMessage
    from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent

    fields = {f.name: f.number for f in PushEvent.DESCRIPTOR.fields}
    assert fields["trace_headers"] == 11 and fields["push_only"] == 16
    assert PushEvent.DESCRIPTOR.full_name == "resonance.mq.v1.PushEvent"
    assert {f.name: f.number for f in PushMessage.DESCRIPTOR.fields}["session_meta"] == 10
    assert PushBatchAck.DESCRIPTOR.full_name == "resonance.gateway.v1.PushBatchAck"
