"""The checkout's layout: one package found by setuptools, and the design's `faust -A app`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "resonance_task"


def test_every_folder_of_code_is_a_package_setuptools_finds() -> None:
    # pyproject finds packages (namespaces off): a folder of modules without an
    # __init__.py would be left out of the wheel without a word.
    found = set(find_packages(str(ROOT), include=["resonance_task*"]))
    folders = {
        ".".join(d.relative_to(ROOT).parts)
        for d in {m.parent for m in PACKAGE.rglob("*.py")}
        if "__pycache__" not in d.parts
    }
    assert folders - found == set()


def test_the_checkouts_app_module_is_the_packages_app() -> None:
    # `faust -A app worker` from a checkout (the design's command) runs the same app
    # as `faust -A resonance_task.app worker` (the image's). The console script, not
    # `python -m`, which would put the checkout on the path by itself.
    result = subprocess.run(
        [str(Path(sys.executable).parent / "faust"), "-A", "app", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "dlq-replay" in result.stdout and "task-dlq-replay" in result.stdout
