"""cxr.tracking against real SQLite stores: concurrent stage processes and per-stage runs."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import mlflow
import pytest

from cxr import tracking

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


def test_processes_opening_a_fresh_default_store_at_once_share_one_experiment(project: Path):
    outcomes = _race(configured_uri="")

    assert [kind for kind, _ in outcomes] == ["ok"] * PROCESSES, outcomes
    ids = {experiment_id for _, experiment_id in outcomes}
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    assert _experiments_named(uri, EXPERIMENT) == list(ids)


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
