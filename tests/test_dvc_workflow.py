"""The review workflow end to end, as a user types it: repro, exp run -S, metrics/plots diff."""

import json
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import copy_project, sh, tool_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("dvc")
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


def test_repro_runs_every_stage_then_nothing(repo):
    out = dvc(repo, "repro")
    for stage in ("download", "split", "preprocess", "train", "evaluate", "gradcam"):
        assert f"Running stage '{stage}'" in out
    folder, env = repo
    sh(folder, "git", "add", "-A", env=env)
    sh(folder, "git", "commit", "-qm", "baseline", env=env)
    tracked = sh(folder, "git", "ls-files", env=env).split()
    assert "dvc.lock" in tracked
    assert "metrics/evaluate.json" in tracked
    assert not any(path.startswith("data/raw/") for path in tracked)
    assert "Running stage" not in dvc(repo, "repro")


def test_metrics_show_parses_every_metrics_file(repo):
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    (workspace,) = shown.values()
    files = workspace["data"]
    assert set(files) == {"metrics/train.json", "metrics/evaluate.json", "metrics/gradcam.json"}
    assert "roc_auc" in files["metrics/evaluate.json"]["data"]["test"]


def test_exp_run_with_set_param_reaches_the_optimizer_as_a_float(repo):
    out = dvc(repo, "exp", "run", "-S", "lr=1e-5", "--name", "small-lr")
    assert "AdamW lr=1e-05" in out  # the optimizer's value, printed with repr: a float
    _, env = repo
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        order_by=["attributes.start_time ASC"],
    )
    assert len(runs) == 2
    experiment_run = runs[-1]
    assert experiment_run.data.params["lr"] == "1e-05"
    assert experiment_run.data.tags["dvc.exp_name"] == "small-lr"
    (first_lr, *_) = client.get_metric_history(experiment_run.info.run_id, "lr")
    assert first_lr.value == 1e-5
    assert "test_roc_auc" in experiment_run.data.metrics


def test_exp_show_and_metrics_diff_show_the_change(repo):
    shown = dvc(repo, "exp", "show", "--no-pager", "--md")
    assert "small-lr" in shown
    assert "1e-05" in shown
    diff = json.loads(dvc(repo, "metrics", "diff", "--json"))
    assert diff["metrics/train.json"]["best_val_auc"]["old"] is not None
    assert "metrics/evaluate.json" in diff
    table = dvc(repo, "metrics", "diff", "main", "--md")  # what the pull-request job posts
    assert "| metrics/train.json" in table


def test_the_winning_experiment_can_be_kept(repo):
    folder, env = repo
    dvc(repo, "exp", "branch", "small-lr", "try-small-lr")
    params = sh(folder, "git", "show", "try-small-lr:params.yaml", env=env)
    assert "lr: 1e-05" in params
    dvc(repo, "exp", "apply", "small-lr")
    assert "lr: 1e-05" in (folder / "params.yaml").read_text()


def test_plots_show_and_diff_render_every_curve(repo):
    folder, _ = repo
    dvc(repo, "plots", "show", "-o", "shown")
    html = (folder / "shown" / "index.html").read_text()
    for title in ("Training history", "ROC curve", "Precision-recall curve", "Calibration"):
        assert title in html
    assert "Confusion matrix (test)" in html
    assert "montage.png" in html
    dvc(repo, "plots", "diff", "HEAD", "-o", "diffed")
    assert "ROC curve" in (folder / "diffed" / "index.html").read_text()
