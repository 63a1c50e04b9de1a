"""The train stage under torchrun: 2 gloo processes on this CPU against 1, and resume."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from tests.conftest import (
    run_stage,
    run_stage_in_process,
    set_params,
    stage_argv,
    store_uri,
    tool_env,
)

pytestmark = pytest.mark.slow

# ConvNeXt normalizes with LayerNorm, per image, so 2 processes must compute what 1 does; torch
# synchronizes BatchNorm on GPUs only. Measured: losses agree to 1e-7, weights to 7e-7.
# An odd batch, so the processes' shares differ (8 and 7 of 15 rows): the loss weighting by
# share is what makes 2 processes' mean gradient the whole batch's.
NO_BATCHNORM = {
    "model": {"arch": "convnext_atto"},
    "epochs": 4,
    "batch_size": 15,
    "train": {"patience": 4},
}
TOLERANCE = 1e-5


def _project(prepared_project: Path, tmp: Path, processes: int, **overrides) -> Path:
    folder = tmp / "project"
    shutil.copytree(prepared_project, folder)
    set_params(folder, {**NO_BATCHNORM, **overrides})
    set_params(folder, {"runtime": {"processes": processes, "threads": 1}})
    return folder


def _env(folder: Path) -> dict[str, str]:
    """The project's own MLflow store, beside it."""
    return tool_env(folder.parent)


@pytest.fixture(scope="module")
def one_and_two(prepared_project: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same training in 1 process and in 2 (each with its own MLflow store)."""
    runs = {}
    for processes in (1, 2):
        folder = _project(prepared_project, tmp_path_factory.mktemp("ddp"), processes)
        if processes == 1:  # in this process: torchrun is the subject only with 2
            runs[1] = (folder, run_stage_in_process(folder, "train", store_uri(folder.parent)))
        else:
            runs[2] = (folder, run_stage(folder, "train", env=_env(folder)))
    return runs


def _history(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "plots/train/history.csv").drop(columns="images_per_s")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "models/model.pt", weights_only=True)["state_dict"]


def test_two_gloo_processes_train_what_one_process_trains(one_and_two):
    (one, _), (two, out) = one_and_two[1], one_and_two[2]
    assert "training convnext_atto on 2 processes (DDP), cpu" in out
    pd.testing.assert_frame_equal(_history(two), _history(one), rtol=TOLERANCE)
    single, parallel = _weights(one), _weights(two)
    assert parallel.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(parallel[key], value, rtol=0, atol=TOLERANCE, msg=key)


def test_rank_zero_alone_writes_and_logs(one_and_two):
    folder, out = one_and_two[2]
    # One process printed the epochs and wrote the outputs; the checkpoint is gone at the end.
    assert out.count("epoch   4/4  train loss") == 1
    assert out.count("-> models/model.pt") == 1
    assert len(_history(folder)) == 4
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())
    client = mlflow.MlflowClient(_env(folder)["MLFLOW_TRACKING_URI"])
    (experiment,) = client.search_experiments(filter_string="name = 'chest-xray-pneumonia'")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["runtime.processes"] == "2"
    assert run.data.metrics["epochs_run"] == 4
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.source_run_id == run.info.run_id


def test_an_interrupted_two_process_run_resumes_to_the_same_model(
    one_and_two, prepared_project: Path, tmp_path: Path
):
    folder = _project(prepared_project, tmp_path, 2)
    set_params(folder, {"runtime": {"memory_budget_gb": 1e-6}})  # and stream the images
    env = _env(folder)
    command = [sys.executable, "-m", "stages.train", *stage_argv(folder, "train")]
    process = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    checkpoint = folder / "checkpoints/train.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # the stage is torchrun, which stops both processes
    process.wait(timeout=120)
    assert checkpoint.exists(), "the run ended before its first checkpoint could be interrupted"
    assert not (folder / "models/model.pt").exists()

    out = run_stage(folder, "train", env=env)
    assert "resuming after epoch" in out and "images streamed to cpu" in out
    uninterrupted = one_and_two[2][0]
    pd.testing.assert_frame_equal(_history(folder), _history(uninterrupted))
    resumed, expected = _weights(folder), _weights(uninterrupted)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1


def test_densenet_trains_in_two_cpu_processes_without_synchronized_batchnorm(
    prepared_project: Path, tmp_path: Path
):
    folder = _project(prepared_project, tmp_path, 2, model={"arch": "densenet121"}, epochs=1)
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", *stage_argv(folder, "train")],
        cwd=folder, env=_env(folder), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    # Refused before torchrun starts: torch has no synchronized BatchNorm on CPUs.
    assert result.returncode == 1
    assert "torchrun" not in result.stderr.lower() and "rank" not in result.stderr
    assert result.stderr.startswith("error: train.sync_batchnorm: synchronized BatchNorm needs")

    set_params(folder, {"train": {"sync_batchnorm": False}})
    out = run_stage(folder, "train", env=_env(folder))
    assert "BatchNorm not synchronized" in out
    assert "densenet121 on 2 processes (DDP)" in out
    state = _weights(folder)
    assert "features.norm0.running_mean" in state
    assert all(torch.isfinite(v.float()).all() for v in state.values())
