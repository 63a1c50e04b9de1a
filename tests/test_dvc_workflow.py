"""The review workflow end to end, as a user types it: repro, exp run -S, metrics/plots diff,
a DVC remote shared by two clones (queued experiments: test_queue.py)."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlflow
import pytest
from dvc.repo import Repo

from cxr.params import as_flat_dict, load_params
from stages.validate import Params
from tests.conftest import (
    MEMBER_STAGES,
    REPO,
    committed_project,
    dvc,
    pipeline_stages,
    set_params,
    sh,
)
from tests.test_contracts import INTENDED_DEPS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return committed_project(tmp_path_factory.mktemp("dvc"))


def test_a_command_returns_when_it_exits_though_a_process_it_started_keeps_its_output(
    tmp_path: Path,
):
    """As `dvc queue start` does: its worker's parent process keeps the command's stdout."""
    started = time.monotonic()
    try:
        out = sh(tmp_path, "bash", "-c", "sleep 120 & echo $! > daemon.pid; echo started")
        assert "started" in out
        assert time.monotonic() - started < 60
    finally:
        os.kill(int((tmp_path / "daemon.pid").read_text()), signal.SIGKILL)


def test_a_command_past_its_time_fails_the_test_and_is_killed(tmp_path: Path):
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="ran past 2 s"):
        sh(tmp_path, "bash", "-c", "echo $$ > shell.pid; sleep 120", timeout=2)
    assert time.monotonic() - started < 60
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "shell.pid").read_text()), 0)


def test_every_test_runs_under_a_time_limit(pytestconfig: pytest.Config):
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) >= 1200  # the slowest test passes within it


def test_repro_runs_every_stage_then_nothing(repo):
    out = dvc(repo, "repro")
    for stage in ("validate", "download", "split", "preprocess", *MEMBER_STAGES, "ensemble",
                  "train", "guard", "evaluate"):  # fmt: skip
        assert f"Running stage '{stage}'" in out
    folder, env = repo
    sh(folder, "git", "add", "-A", env=env)
    sh(folder, "git", "commit", "-qm", "baseline", env=env)
    tracked = sh(folder, "git", "ls-files", env=env).split()
    assert "dvc.lock" in tracked
    assert "metrics/evaluate.json" in tracked
    assert not any(path.startswith("data/raw/") for path in tracked)
    assert "Running stage" not in dvc(repo, "repro")


def test_a_teammate_pulls_from_the_remote_and_recomputes_nothing(repo, tmp_path: Path):
    folder, env = repo
    remote = tmp_path / "dvc-remote"  # a plain directory; s3://, gs://, azure://, ssh:// alike
    dvc(repo, "remote", "add", "--default", "team", str(remote))
    dvc(repo, "push", "--run-cache")
    sh(folder, "git", "commit", "-qam", "DVC remote", env=env)
    assert any(remote.rglob("*"))

    clone = tmp_path / "teammate"
    sh(tmp_path, "git", "clone", "-q", str(folder), str(clone), env=env)
    teammate = (clone, env)
    assert not (clone / "models/model.pt").exists()
    dvc(teammate, "pull")
    assert "Running stage" not in dvc(teammate, "repro")
    assert "up to date" in dvc(teammate, "status")
    xray = next((clone / "data/raw/test/PNEUMONIA").iterdir())
    predict = Path(sys.executable).parent / "pneumonia-predict"
    cams = tmp_path / "cams"
    out = sh(
        clone, str(predict), str(xray), "--model", "models/model.pt", "--out", str(cams), env=env
    )
    assert f"{xray}  p(pneumonia)=" in out
    # The pulled model is the one the first clone trained, byte for byte.
    assert (clone / "models/model.pt").read_bytes() == (folder / "models/model.pt").read_bytes()

    # The pull-request workflow's way: the remote from a secret, nothing recomputed.
    ci = tmp_path / "ci"
    sh(tmp_path, "git", "clone", "-q", str(folder), str(ci), env=env)
    dvc((ci, env), "remote", "add", "--local", "--default", "--force", "team", str(remote))
    out = sh(ci, "bash", str(REPO / ".ci/reproduce"), env={**env, "DVC_REMOTE_URL": str(remote)})
    assert "Running stage" not in out
    assert (ci / "models/model.pt").read_bytes() == (folder / "models/model.pt").read_bytes()


def _changed(value):
    """Another value of the same type, valid or not: DVC compares values, it does not check them."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}-changed"


def _nested(key: str, value) -> dict:
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


def test_each_param_makes_exactly_the_stages_that_read_it_stale(repo):
    """The end-to-end half of tests/test_contracts.py: DVC itself, one param at a time."""
    folder, _ = repo
    params_file = folder / "params.yaml"
    original = params_file.read_text()
    declared = {name: stage.get("params", []) for name, stage in pipeline_stages(folder).items()}
    keys = as_flat_dict(load_params(Params, params_file))
    try:
        for key, value in keys.items():
            set_params(folder, _nested(key, _changed(value)))
            with Repo(str(folder)) as dvc_repo:
                stale = {address.split(":")[-1] for address in dvc_repo.status()}
            expected = {
                name for name, entries in declared.items()
                if any(key == d or key.startswith(f"{d}.") for d in entries)
            }  # fmt: skip
            assert stale == expected, key
            params_file.write_text(original)
    finally:
        params_file.write_text(original)
    assert {"validate", "train", *MEMBER_STAGES} == {n for n, e in declared.items() if "train" in e}
    # The deployed network's knobs retrain no member; a member's entry retrains it alone.
    assert not [n for n, e in declared.items() if n.startswith("member@") and "lr" in e]
    assert "members.lite0" in declared["member@lite0"] and "members" in declared["ensemble"]
    assert len(keys) > 40


def test_a_docstring_edit_makes_exactly_the_intended_stages_stale(repo):
    """DVC itself, one module at a time: the table tests/test_contracts.py holds is what
    `dvc status` reports after an edit that cannot change any output."""
    folder, _ = repo
    for module, stages in INTENDED_DEPS.items():
        path = folder / module
        original = path.read_text()
        path.write_text(original.replace('"""', '"""Edited. ', 1))
        try:
            with Repo(str(folder)) as dvc_repo:
                # member@lite0, member@resnet: the table's `member`
                stale = {address.split(":")[-1].split("@")[0] for address in dvc_repo.status()}
        finally:
            path.write_text(original)
        assert stale == set(stages.split()), module


def test_metrics_show_parses_every_metrics_file(repo):
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    (workspace,) = shown.values()
    files = workspace["data"]
    assert set(files) == {
        *(f"metrics/members/{stage.split('@')[1]}.json" for stage in MEMBER_STAGES),
        "metrics/ensemble.json",
        "metrics/train.json",
        "metrics/evaluate.json",
        "metrics/guard.json",
        "metrics/gradcam.json",
        "metrics/export.json",
    }
    assert "roc_auc" in files["metrics/evaluate.json"]["data"]["test"]
    assert "auroc" in files["metrics/guard.json"]["data"]["by_kind"]["noise"]


def test_exp_run_with_set_param_reaches_the_optimizer_as_a_float(repo):
    out = dvc(repo, "exp", "run", "-S", "lr=1e-5", "--name", "small-lr")
    assert "AdamW lr=1e-05" in out  # the optimizer's value, printed with repr: a float
    # params.yaml is checked again, and its unchanged stamp re-runs nothing upstream of train.
    assert "Running stage 'validate'" in out and "Running stage 'train'" in out
    assert "Running stage 'download'" not in out and "Running stage 'preprocess'" not in out
    # The deployed network's learning rate: no member retrains, the teacher is unchanged.
    assert "Running stage 'member@" not in out and "Running stage 'ensemble'" not in out
    _, env = repo
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`dvc.exp_name` = 'small-lr'",
        order_by=["attributes.start_time ASC"],
    )
    # One training run and one child run per later stage, all tagged with the experiment.
    stages = [r.data.tags.get("dvc.stage") for r in runs]
    assert stages[:3] == ["train", "guard", "evaluate"]
    assert sorted(stages[3:]) == ["export", "gradcam"]
    training_run = runs[0]
    assert training_run.data.params["lr"] == "1e-05"
    history = client.get_metric_history(training_run.info.run_id, "lr")
    # Logged at each epoch's first step: epoch 1 is mid warm-up, epoch 2 starts at the peak.
    assert [m.value for m in sorted(history, key=lambda m: m.step)][1] == 1e-5
    for child in runs[1:]:
        assert child.data.tags["mlflow.parentRunId"] == training_run.info.run_id
    assert "guard_ood_auroc" in runs[1].data.metrics and "test_roc_auc" in runs[2].data.metrics
    # The registered version names the experiment and the commit it came from.
    version = client.get_model_version_by_alias("chest-xray-pneumonia", "candidate")
    assert version.tags["dvc.exp_name"] == "small-lr"
    assert version.tags["git.commit"] == sh(repo[0], "git", "rev-parse", "HEAD").strip()
    # -S wrote lr into params.yaml: not the commit's tree, and the tags say what differs.
    assert (version.tags["git.dirty"], version.tags["git.changed"]) == ("True", "params.yaml")


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


@pytest.mark.skipif(
    not os.environ.get("CXR_LONG_TESTS"),
    reason="two folds' pipelines, two partial ones and the workspace rebuilt, about 8 min on 2 "
    "cores, more than CI can spare: CXR_LONG_TESTS=1 runs it",
)
def test_cross_validation_runs_each_configuration_on_every_fold_and_restores_the_workspace(repo):
    folder, env = repo
    params_before = (folder / "params.yaml").read_text()
    metrics_before = (folder / "metrics/evaluate.json").read_text()
    out = sh(
        folder, sys.executable, str(REPO / "tools/cross_validate.py"), "--folds", "2",
        "--config", "base", "--config", "cams", "gradcam.per_outcome=1", env=env,
    )  # fmt: skip
    assert out.count("dvc exp run -S split.val_fraction=0.5 -S split.fold=0") == 2
    assert "dvc exp run -S split.val_fraction=0.5 -S split.fold=1 -S gradcam.per_outcome=1" in out
    folds = {
        line.split(":", 1)[0]: json.loads(line.split(":", 1)[1])
        for line in out.splitlines()
        if " fold " in line and line.split(":", 1)[0].endswith(("1/2", "2/2"))
    }
    # Each fold validates other patients; a Grad-CAM setting cannot change the network's
    # figures, and the second configuration reuses each fold's network (DVC skips the stages
    # it leaves unchanged).
    assert folds["base fold 1/2"] != folds["base fold 2/2"]
    assert folds["cams fold 1/2"] == folds["base fold 1/2"]
    assert folds["cams fold 2/2"] == folds["base fold 2/2"]
    assert "| cams minus base (paired) | +0.0000 ± 0.0000 |" in out
    assert out.count("Running stage 'train'") == 2
    assert (folder / "params.yaml").read_text() == params_before
    assert (folder / "metrics/evaluate.json").read_text() == metrics_before
