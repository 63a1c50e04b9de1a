"""Shared fixtures: tiny generated data and throwaway copies of the project."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("cxr", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore")

# Small enough that the pipeline runs in seconds on a CPU: timm's test_resnet (0.4M weights,
# ten times faster than DenseNet121 at 32 px) wherever DenseNet121 is not the subject; the tests
# that are about it build one (Grad-CAM's default layer, DenseNet121 under torchrun).
TINY_ARCH = "test_resnet"
TINY_PARAMS = {
    "image_size": 32,
    "model": {"arch": TINY_ARCH},
    "epochs": 2,
    "batch_size": 16,
    "data": {"demo_patients": 40, "demo_min_side": 48, "demo_max_side": 80},
    "train": {"patience": 2},
    "runtime": {"workers": 1, "threads": 1},  # one core per pytest-xdist worker
    "guard": {"ood_images": 8},
    "evaluate": {"bootstrap": 50},
    "gradcam": {"per_outcome": 1, "score_images": 8, "target_layer": "layer3"},  # 2x2 maps
}
# The demo's members, kept (so stage names match the repository's: member@lite0, member@resnet)
# and shortened: Lite0 from the locked ImageNet wheel trains its head for one epoch.
TINY_MEMBERS = {
    "lite0": {"epochs": 1, "freeze_epochs": 1},
    "resnet": {"arch": TINY_ARCH, "epochs": 2},
}
MEMBER_STAGES = tuple(f"member@{name}" for name in TINY_MEMBERS)


def pipeline_stages(folder: Path) -> dict[str, dict]:
    """dvc.yaml's stages as DVC names them: a foreach stage becomes one stage per item of the
    params.yaml entry it iterates (member -> member@lite0, member@resnet)."""
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((folder / "params.yaml").read_text())
    expanded = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        definition = yaml.safe_dump(stage["do"])
        for key in params[stage["foreach"].removeprefix("${").removesuffix("}")]:
            expanded[f"{name}@{key}"] = yaml.safe_load(definition.replace("${key}", key))
    return expanded


def stage_argv(folder: Path, stage: str) -> list[str]:
    """The arguments dvc.yaml gives a stage on its command line (after `python -m stages.x`)."""
    return pipeline_stages(folder)[stage]["cmd"].split()[3:]


def stage_module(stage: str) -> str:
    """member@lite0 -> stages.member"""
    return f"stages.{stage.split('@')[0]}"


def run_stage(folder: Path, stage: str, env: dict[str, str] | None = None) -> str:
    """Run a stage as DVC would, in a subprocess, with the command line from dvc.yaml."""
    return sh(
        folder, sys.executable, "-m", stage_module(stage), *stage_argv(folder, stage), env=env
    )


def run_stage_in_process(folder: Path, stage: str, tracking_uri: str | None = None) -> str:
    """Run a stage's `main` in this process with its command line from dvc.yaml, in `folder`,
    and return what it printed: for tests whose subject is the stage's outputs (neither DVC nor
    a fresh interpreter), without a Python start and imports per stage.

    What a stage leaves in the process is put back: MLflow keeps the tracking URI in a global
    (and in $MLFLOW_TRACKING_URI), training sets torch's thread count.
    """
    module = importlib.import_module(stage_module(stage))
    threads = torch.get_num_threads()
    printed = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(printed),
        contextlib.redirect_stderr(printed),
    ):
        patch.chdir(folder)
        if tracking_uri:
            patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        else:
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            module.main(stage_argv(folder, stage))
        finally:
            mlflow.set_tracking_uri(None)  # before the patch restores the variable
            torch.set_num_threads(threads)
    return printed.getvalue()


def store_uri(folder: Path) -> str:
    """An MLflow store beside a test's project, as tool_env gives stage subprocesses."""
    return f"sqlite:///{folder / 'mlflow.db'}"


def set_params(folder: Path, overrides: dict) -> None:
    """Merge nested overrides into folder/params.yaml."""
    path = folder / "params.yaml"
    params = yaml.safe_load(path.read_text())

    def merge(target: dict, changes: dict) -> None:
        for key, value in changes.items():
            if isinstance(value, dict):
                merge(target[key], value)
            else:
                target[key] = value

    merge(params, overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)
    set_params(dest, TINY_PARAMS | {"members": TINY_MEMBERS})
    return dest


def committed_project(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A tiny project in tmp/project as a git and DVC repository with one commit, and the
    environment its commands run in."""
    folder = copy_project(tmp / "project")
    env = tool_env(tmp)
    sh(folder, "git", "init", "-q", "-b", "main", env=env)
    sh(folder, sys.executable, "-m", "dvc", "init", "-q", env=env)
    sh(folder, "git", "add", "-A", env=env)
    sh(folder, "git", "commit", "-qm", "project", env=env)
    return folder, env


def dvc(repo: tuple[Path, dict[str, str]], *args: str) -> str:
    folder, env = repo
    return sh(folder, sys.executable, "-m", "dvc", *args, env=env)


def tool_env(tmp: Path) -> dict[str, str]:
    """Environment for DVC and stage subprocesses: this venv first, MLflow in a temp store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = store_uri(tmp)
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
    return env


# A bound on any one command in a test: a whole tiny `dvc repro` takes a few minutes on two
# cores. pytest-timeout (pyproject.toml) bounds each test as a whole as well.
SH_TIMEOUT_S = 1200


def sh(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = SH_TIMEOUT_S
) -> str:
    """Run a command, failing the test with its output if it fails or runs past `timeout` s.

    Its output goes to files, not pipes. `dvc queue start` forks a process per queue worker
    that keeps the command's stdout and stderr open for as long as the worker lives, and a
    worker can outlive its queue (docs/scaling.md): reading a pipe waits until every holder
    closes it, which can be never, while a file is read once the command itself has exited.
    The command runs in a session of its own, so an overrun kills it with its children.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # after an overrun, or pytest-timeout or Ctrl-C ending the test meanwhile
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        output = {}
        for name, file in (("stdout", out), ("stderr", err)):
            file.seek(0)
            output[name] = file.read().decode(errors="replace")
    if returncode is None:
        pytest.fail(
            f"{' '.join(args)} ran past {timeout:g} s:\n{output['stdout']}\n{output['stderr']}"
        )
    if returncode != 0:
        pytest.fail(f"{' '.join(args)} failed:\n{output['stdout']}\n{output['stderr']}")
    return output["stdout"] + output["stderr"]


def request_json(
    url: str, body: bytes | Iterator[bytes], headers: dict[str, str]
) -> tuple[int, dict]:
    """POST and read the JSON answer, an error status's included: (status, answer)."""
    request = urllib.request.Request(url, body, headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(command: list[str], url: str, ready: str, **popen) -> subprocess.Popen:
    """Start a server process and wait until GET url+ready answers; fail with its output if it
    exits or takes over 3 minutes. The caller stops it.

    The output goes to a file, not a pipe: a server that logs every request would block once a
    pipe nobody reads is full.
    """
    with tempfile.TemporaryFile(mode="w+") as output:  # the server keeps its own handle
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, text=True, **popen
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + ready, timeout=2):
                    return process
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    output.seek(0)
                    pytest.fail(f"{command[0]} did not start:\n{output.read()}")
                time.sleep(0.5)


@dataclass
class Server:
    url: str
    workdir: Path  # the server's working directory and TMPDIR, empty at the start


# pytest-xdist runs a test process per core (pyproject.toml): each takes its share, since torch
# would start a thread per core in every one and they would evict each other's caches.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

LAYER = "layer2"  # test_resnet's 4x4 maps at the tiny 32 px (the last block's are 1x1)


def start_web(model: Path, tmp: Path) -> Iterator[Server]:
    """`pneumonia-web --model ...` on a free loopback port, stopped when the caller is done."""
    workdir = tmp / "server"
    workdir.mkdir()
    port = free_port()
    command = [str(Path(sys.executable).parent / "pneumonia-web"), "--model", str(model),
               "--port", str(port), "--target-layer", LAYER]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(workdir)}
    url = f"http://127.0.0.1:{port}"
    process = serve(command, url, "/api/model", cwd=workdir, env=env)
    try:
        yield Server(url, workdir)
        assert process.poll() is None, "the server died"
    finally:
        process.terminate()
        process.wait(timeout=30)


# The unit tier (`pytest -m unit`, under half a minute on 2 cores, to run while coding): the pure
# logic of these modules, in process, on arrays and files made in the test. A test in them that
# needs a pipeline built by a fixture below is left to the full run.
UNIT_MODULES = {
    "test_classifier", "test_contracts", "test_demo", "test_evaluation", "test_explain",
    "test_guard", "test_images", "test_members", "test_params", "test_sources", "test_split",
}  # fmt: skip
BUILDING_FIXTURES = {"prepared_project", "trained", "reads", "project"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in UNIT_MODULES and not BUILDING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project with tiny params, as the working directory."""
    folder = copy_project(tmp_path / "project")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tmp_path))
    return folder


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project whose stages up to train have run: data, members, ensemble (the teacher)
    and pretrained (read-only use)."""
    tmp = tmp_path_factory.mktemp("prepared")
    folder = copy_project(tmp / "project")
    for stage in ("validate", "download", "split", "preprocess", *MEMBER_STAGES):
        run_stage_in_process(folder, stage, store_uri(tmp))
    for stage in ("ensemble", "pretrained"):
        run_stage_in_process(folder, stage, store_uri(tmp))
    return folder


@pytest.fixture(scope="session")
def trained(prepared_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the prepared project after train, guard, evaluate and gradcam (read-only use)."""
    tmp = tmp_path_factory.mktemp("trained")
    folder = tmp / "project"
    shutil.copytree(prepared_project, folder)
    for stage in ("train", "guard", "evaluate", "gradcam"):
        run_stage_in_process(folder, stage, store_uri(tmp))
    return folder
