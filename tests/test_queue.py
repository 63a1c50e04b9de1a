"""Queued experiments as a team runs them: `dvc queue start -j 2` in a fresh clone, each run
and model logged to a tracking server. A module of its own, so a second test process runs it
beside the rest of the DVC workflow (pytest-xdist)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from tests.conftest import (
    committed_project,
    copy_project,
    dvc,
    free_port,
    run_stage_in_process,
    serve,
    set_params,
    sh,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A committed tiny project, and the demo X-rays in the Kaggle layout beside it (as
    ../shared is beside a checkout)."""
    scratch = copy_project(tmp_path / "scratch")
    for stage in ("validate", "download"):
        run_stage_in_process(scratch, stage)
    for split in ("train", "val", "test"):
        shutil.copytree(scratch / "data/raw" / split, tmp_path / "xrays" / split)
    return committed_project(tmp_path)


def _wait_for_queue(repo: tuple[Path, dict[str, str]], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(5)
    pytest.fail(f"the queue did not finish in {timeout_s} s:\n{status}")


def _failed_tasks(status: str) -> list[str]:
    return [line.split()[1] for line in status.splitlines() if line.endswith("Failed")]


def _task_log(repo: tuple[Path, dict[str, str]], name: str) -> str | None:
    """`dvc queue logs NAME`: its stages' output, or None where DVC kept none because the task
    failed before a stage ran (DVC then says so and points to its celery worker logs)."""
    folder, env = repo
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "queue", "logs", name],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode != 0 and "failed during setup" in done.stdout + done.stderr:
        return None
    return done.stdout + done.stderr


def _worker_logs(project: Path) -> str:
    """The end of each celery worker's own log: where a task that failed in DVC's setup says
    why (treeverse/dvc#9143)."""
    return "\n".join(
        f"--- {out.name}:\n{out.read_text(errors='replace')[-4000:]}"
        for out in sorted((project / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.out"))
    )


def _queue_workers(project: Path) -> list[int]:
    """Live `dvc exp queue-worker` processes of `project`'s queue.

    DVC records each worker it starts in .dvc/tmp/exps/celery/dvc-exp-worker-<k>.json; a
    worker runs in the project folder, which finds it without a record too. Linux's /proc says
    which are alive and still queue workers (a pid can be reused).
    """
    pids = set()
    for record in (project / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            pids.add(int(json.loads(record.read_text())["pid"]))
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")) == project:
                pids.add(int(entry.name))
    alive = []
    for pid in sorted(pids):
        with contextlib.suppress(OSError):  # gone, or a zombie (no command line)
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
    return alive


def _stop_queue_workers(repo: tuple[Path, dict[str, str]], grace_s: float = 120) -> list[int]:
    """Stop the queue's workers once it is done; return those that had to be killed.

    A worker normally exits when the queue is empty, but with several workers one can stay,
    idle, for ever: its monitor thread dies on a JSONDecodeError from kombu's filesystem
    transport (treeverse/dvc#10398, #10428; dvc-task#73). `dvc queue stop` asks every worker
    to shut down; whatever is still alive after `grace_s` is terminated, then killed.
    """
    folder, _ = repo
    with contextlib.suppress(pytest.fail.Exception):  # killed below all the same
        dvc(repo, "queue", "stop")
    deadline = time.monotonic() + grace_s
    while _queue_workers(folder) and time.monotonic() < deadline:
        time.sleep(2)
    lingered = _queue_workers(folder)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _queue_workers(folder):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 30
        while _queue_workers(folder) and time.monotonic() < deadline:
            time.sleep(1)
    return lingered


def _run_queue(repo: tuple[Path, dict[str, str]], jobs: int) -> str:
    """Start `jobs` workers, wait for the queue to finish, stop the workers; its status."""
    try:
        dvc(repo, "queue", "start", "-j", str(jobs))
        status = _wait_for_queue(repo, timeout_s=900)
    finally:
        lingered = _stop_queue_workers(repo)
    assert not _queue_workers(repo[0])
    if lingered:  # the upstream race, not this project's bug: noted, not failed
        warnings.warn(
            f"dvc queue workers {lingered} outlived their queue and `dvc queue stop`; killed "
            "(treeverse/dvc#10398)",
            stacklevel=1,
        )
    return status


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server` as docs/scaling.md starts it for a team, on a free loopback port: runs in a
    SQL database, artifacts stored by the server and served through it."""
    store = tmp_path / "mlflow-server"
    store.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1",
    ]  # fmt: skip
    server = serve(command, url, "/health", start_new_session=True)
    try:
        yield url, store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_queued_experiments_log_to_a_tracking_server_two_at_a_time_from_a_fresh_clone(
    repo, tracking_server, tmp_path: Path
):
    """`dvc queue start -j 2` runs in .dvc/tmp/exps/ and logs every run and model to the
    team's server through MLFLOW_TRACKING_URI, no file to the clone."""
    folder, env = repo
    url, store = tracking_server
    clone = tmp_path / "clone"  # beside ../xrays
    sh(tmp_path, "git", "clone", "-q", str(folder), str(clone), env=env)
    env = {**env, "MLFLOW_TRACKING_URI": url}  # the workers inherit `dvc queue start`'s env
    queue = (clone, env)
    # runtime.threads 0: each of the two workers takes half the cores (cxr/device.py).
    set_params(
        clone,
        {"data": {"source": "local", "local_path": "../xrays"}, "runtime": {"threads": 0}},
    )
    sh(clone, "git", "commit", "-qam", "local source, relative path", env=env)
    settings = {"lr-2e-3": "lr=0.002", "seed-1": "seed=1"}
    for name, setting in settings.items():
        dvc(queue, "exp", "run", "--queue", "--name", name, "-S", setting)
    status = _run_queue(queue, jobs=2)
    # A task whose stages ran and failed is this project's bug. One that failed before any
    # stage ran, with no log, is DVC's race between workers (treeverse/dvc#10673): noted, and
    # that experiment queued again, alone.
    failed = _failed_tasks(status)
    for name in failed:
        log = _task_log(queue, name)
        assert log is None, f"{status}\n--- dvc queue logs {name}:\n{log[-6000:]}"
    if failed:
        warnings.warn(
            f"queued experiments {failed} failed before any stage ran, queued again "
            f"(treeverse/dvc#10673):\n{_worker_logs(clone)}",
            stacklevel=1,
        )
        dvc(queue, "queue", "remove", "--failed")
        for name in failed:
            dvc(queue, "exp", "run", "--queue", "--name", name, "-S", settings[name])
        status = _run_queue(queue, jobs=1)
    assert status.count("Success") == 2, f"{status}\n{_worker_logs(clone)}"

    client = mlflow.MlflowClient(tracking_uri=url)
    (experiment,) = client.search_experiments(filter_string="name = 'chest-xray-pneumonia'")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["dvc.stage"], []).append(run.data.tags["dvc.exp_name"])
    # Each experiment: one training run and one evaluation record, under its own name.
    assert len(set(by_stage["train"])) == len(by_stage["train"]) == 2
    assert sorted(by_stage["evaluate"]) == sorted(by_stage["train"])
    # Their models: logged by each training run and registered by each evaluation, stored by
    # the server, and loadable from it by name.
    trained = {r.info.run_id for r in runs if r.data.tags["dvc.stage"] == "train"}
    logged = client.search_logged_models([experiment.experiment_id])
    assert trained <= {m.source_run_id for m in logged}
    versions = client.search_model_versions("name = 'chest-xray-pneumonia'")
    assert len(versions) == 2
    assert {(v.tags["git.dirty"], v.tags["git.changed"]) for v in versions} == {
        ("True", "params.yaml")
    }
    assert len(list((store / "artifacts").rglob("MLmodel"))) == len(logged) >= 4
    assert all(run.info.artifact_uri.startswith("mlflow-artifacts:/") for run in runs)
    assert "mlruns" not in sh(clone, "git", "status", "--porcelain", env=env)
    load = (
        "import mlflow; model = mlflow.pyfunc.load_model('models:/chest-xray-pneumonia@candidate')"
        "; print(model.metadata.signature.outputs.input_names())"
    )
    assert "'probability'" in sh(clone.parent, sys.executable, "-c", load, env=env)
