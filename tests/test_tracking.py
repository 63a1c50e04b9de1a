"""cxr.tracking against real SQLite stores: concurrent stage processes and per-stage runs."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import mlflow
import pytest

from cxr import tracking
from tests.conftest import REPO

PROCESSES = 4  # `dvc queue start -j 2` is the usual case; more makes the race easier to hit
EXPERIMENT = "chest-xray-pneumonia"
MISSING_RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project whose default store is tmp_path/mlruns, as DVC_ROOT points stages there.

    MLflow keeps the tracking URI in a global and in $MLFLOW_TRACKING_URI: both are put back
    so the next test starts from the default store again.
    """
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _use_experiment_at_once(
    configured_uri: str, barrier: Barrier, results: Queue[tuple[str, str]]
) -> None:
    """One stage process: wait for the others, then get the experiment (opening the store).

    A store named by URI is opened before the barrier, as a store in use has its schema
    already: the processes then race on the experiment alone, which makes collisions likely.
    """
    if configured_uri:
        mlflow.MlflowClient(configured_uri)
    barrier.wait(timeout=120)
    try:
        results.put(("ok", tracking.use_experiment(EXPERIMENT, configured_uri)))
    except Exception as error:  # reported to the test, which names it
        results.put(("error", f"{type(error).__name__}: {error}"))


def _race(configured_uri: str) -> list[tuple[str, str]]:
    """PROCESSES fresh interpreters (as DVC starts stages) released together by a barrier."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results = context.Queue()
    workers = [
        context.Process(target=_use_experiment_at_once, args=(configured_uri, barrier, results))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    return outcomes


def _experiments_named(uri: str, name: str) -> list[str]:
    client = mlflow.MlflowClient(uri)
    return [e.experiment_id for e in client.search_experiments(filter_string=f"name = '{name}'")]


@pytest.mark.slow  # many processes opening one store at once
def test_processes_opening_a_fresh_default_store_at_once_share_one_experiment(project: Path):
    outcomes = _race(configured_uri="")

    assert [kind for kind, _ in outcomes] == ["ok"] * PROCESSES, outcomes
    ids = {experiment_id for _, experiment_id in outcomes}
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    assert _experiments_named(uri, EXPERIMENT) == list(ids)


@pytest.mark.slow  # many processes opening one store at once
def test_processes_creating_one_experiment_on_a_shared_store_at_once_share_it(project: Path):
    # A store of the user's (or a team server) gets no lock: a lost create must re-read.
    uri = f"sqlite:///{project / 'shared.db'}"
    mlflow.MlflowClient(uri)  # creates the schema: the workers open a store in use

    outcomes = _race(configured_uri=uri)

    assert [kind for kind, _ in outcomes] == ["ok"] * PROCESSES, outcomes
    ids = {experiment_id for _, experiment_id in outcomes}
    assert _experiments_named(uri, EXPERIMENT) == list(ids)


def _training_run() -> str:
    experiment_id = tracking.use_experiment(EXPERIMENT, "")
    with mlflow.start_run(experiment_id=experiment_id, run_name="train") as training:
        mlflow.log_metric("best_val_auc", 0.91)
        mlflow.set_tag("dvc.exp_name", "baseline")
    return training.info.run_id


def test_each_stage_execution_gets_its_own_child_of_the_training_run(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    training_id = _training_run()
    client = mlflow.MlflowClient(mlflow.get_tracking_uri())
    before = client.get_run(training_id)
    monkeypatch.setenv("DVC_EXP_NAME", "flip-tta")

    children = []
    for auc in (0.81, 0.84):  # e.g. evaluate re-run on a cached train stage
        with tracking.start_stage_run(EXPERIMENT, "", training_id, "evaluate") as active:
            mlflow.log_metric("test_roc_auc", auc)
        children.append(client.get_run(active.info.run_id))

    assert len({child.info.run_id for child in children} | {training_id}) == 3
    for child, auc in zip(children, (0.81, 0.84), strict=True):
        assert child.info.experiment_id == before.info.experiment_id
        assert child.info.run_name == "evaluate"
        assert child.data.metrics == {"test_roc_auc": auc}
        assert child.data.tags["mlflow.parentRunId"] == training_id
        assert child.data.tags["training_run_id"] == training_id
        assert child.data.tags["dvc.exp_name"] == "flip-tta"
        assert child.data.tags["dvc.stage"] == "evaluate"
    after = client.get_run(training_id)
    assert after.data.metrics == before.data.metrics == {"best_val_auc": 0.91}
    assert after.data.tags == before.data.tags
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)


def test_a_model_trained_elsewhere_gets_a_top_level_run_naming_its_training_run(
    project: Path, capsys: pytest.CaptureFixture[str]
):
    with tracking.start_stage_run(EXPERIMENT, "", MISSING_RUN_ID, "gradcam") as active:
        mlflow.log_metric("gradcam_pointing_game", 0.5)

    run = mlflow.MlflowClient(mlflow.get_tracking_uri()).get_run(active.info.run_id)
    assert run.info.run_id != MISSING_RUN_ID
    assert run.info.experiment_id == _experiments_named(mlflow.get_tracking_uri(), EXPERIMENT)[0]
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["training_run_id"] == MISSING_RUN_ID
    assert run.data.tags["dvc.stage"] == "gradcam"
    assert run.data.metrics == {"gradcam_pointing_game": 0.5}
    assert MISSING_RUN_ID in capsys.readouterr().out
    assert mlflow.get_tracking_uri() == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git checkout of the project's dvc.yaml, params and one module, with the outputs a
    previous `dvc repro` committed (metrics, threshold, plots, dvc.lock), as the working
    directory, as DVC runs a stage."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    shutil.copy(REPO / "dvc.yaml", folder)
    shutil.copy(REPO / "params.yaml", folder)
    (folder / "cxr").mkdir()
    shutil.copy(REPO / "cxr/tracking.py", folder / "cxr")
    for path in STAGE_WRITES:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text('{"run": "the last commit\'s"}\n')  # JSON is YAML too
    monkeypatch.chdir(folder)
    for variable in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{variable}_NAME", "test")
        monkeypatch.setenv(f"GIT_{variable}_EMAIL", "test@example.com")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", *command], check=True, timeout=60)
    return folder


# Tracked files that `dvc repro` rewrites before evaluate registers the model.
STAGE_WRITES = (
    "dvc.lock",
    "metrics/train.json",
    "metrics/evaluate.json",
    "models/threshold.json",
    "plots/evaluate/test_roc.csv",
    "plots/train/history.csv",
    "metrics/members/lite0.json",  # a foreach stage's outputs
    "plots/members/lite0/history.csv",
    "data/members/.gitignore",  # DVC's, beside the outputs it caches
)


def _head() -> str:
    command = ["git", "rev-parse", "HEAD"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.strip()


def test_a_checkout_whose_pipeline_rewrote_its_own_outputs_is_clean(checkout: Path):
    assert tracking.run_tags()["git.dirty"] == "False"
    for path in STAGE_WRITES:
        (checkout / path).write_text('{"run": "this one"}\n')

    tags = tracking.run_tags()

    assert tags["git.commit"] == _head() != ""
    assert tags["git.dirty"] == "False"
    assert "git.changed" not in tags


@pytest.mark.parametrize("edited", ["params.yaml", "cxr/tracking.py", "dvc.yaml"])
def test_changed_code_or_params_make_a_checkout_dirty_and_are_named(checkout: Path, edited: str):
    (checkout / "metrics/evaluate.json").write_text('{"run": "this one"}\n')
    with (checkout / edited).open("a") as file:
        file.write("# edited\n")

    tags = tracking.run_tags()

    assert tags["git.dirty"] == "True"
    assert tags["git.changed"] == edited


def test_a_change_staged_but_not_committed_is_dirty_too(checkout: Path):
    (checkout / "cxr/tracking.py").write_text("")
    subprocess.run(["git", "add", "cxr/tracking.py"], check=True, timeout=60)
    assert tracking.run_tags()["git.dirty"] == "True"


def test_outside_a_git_checkout_there_are_no_git_tags(project: Path):
    tags = tracking.run_tags()
    assert not [key for key in tags if key.startswith("git.")]


def test_pipeline_outputs_are_every_declared_output_of_dvc_yaml():
    outputs = tracking.pipeline_outputs(REPO / "dvc.yaml")
    assert {"models/threshold.json", "metrics/evaluate.json", "plots/evaluate"} <= outputs
    assert {"data/processed", "models/model.pt", "plots/train/history.png"} <= outputs
    assert not {"params.yaml", "dvc.yaml", "stages/evaluate.py", "data/raw/lesions.csv"} & outputs
    members = {"models/members/resnet.pt", "data/members/lite0.csv", "metrics/ensemble.json"}
    assert members <= outputs
