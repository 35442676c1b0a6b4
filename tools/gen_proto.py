"""Generate the Python code for proto/ into resonance_task/proto/ (messages, gRPC stubs,
typing stubs).

python tools/gen_proto.py           # rewrite the generated files in place
python tools/gen_proto.py --check   # exit 1 if the committed files are stale

The contract stays at the top of the checkout (proto/, what other teams read); its code is
part of the one installed package. protoc names modules after the .proto paths
(`proto.resonance...`); they are installed as `resonance_task.proto.resonance...` (so
nothing the project installs is called `proto`, as proto-plus's package is), and the
generated imports are rewritten to match. The .proto paths, and so the descriptors' file
names, stay as they are: a descriptor's file name is part of what a peer's registry sees.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE = "resonance_task"
# protoc writes proto/x.proto's code to proto/x_pb2.py; it belongs at resonance_task/proto/.
OUT_ROOT = ROOT / PACKAGE
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# `from proto.resonance.x import y_pb2` and the module name _builder gives the classes.
_MODULE_NAMES = re.compile(
    r"^(from |_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')proto\.", re.M
)


def sources() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc over every .proto into `out`; return the files written, relative to it."""
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(ROOT)) for p in sources()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = [p for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)]
    for path in written:
        path.write_text(_MODULE_NAMES.sub(rf"\1{PACKAGE}.proto.", path.read_text()))
    return sorted(p.relative_to(out) for p in written)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(
            p.relative_to(OUT_ROOT)
            for p in (OUT_ROOT / "proto").rglob("*")
            if p.name.endswith(GENERATED_SUFFIXES)
        )
        stale = [
            str(OUT_ROOT.relative_to(ROOT) / rel)
            for rel in fresh
            if not (OUT_ROOT / rel).exists()
            or not filecmp.cmp(Path(tmp) / rel, OUT_ROOT / rel, shallow=False)
        ]
        stale += [str(OUT_ROOT.relative_to(ROOT) / rel) for rel in committed if rel not in fresh]
        if check:
            for name in stale:
                print(f"stale: {name}", file=sys.stderr)
            if stale:
                print("run: python tools/gen_proto.py", file=sys.stderr)
            return 1 if stale else 0
        for rel in committed:
            if rel not in fresh:
                (OUT_ROOT / rel).unlink()
        for rel in fresh:
            (OUT_ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            # Regular packages all the way down: tools find them without namespace rules.
            for package in (OUT_ROOT / rel).relative_to(OUT_ROOT).parents[:-1]:
                (OUT_ROOT / package / "__init__.py").touch()
            shutil.copyfile(Path(tmp) / rel, OUT_ROOT / rel)
        print(f"generated {len(fresh)} files from {len(sources())} protos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
