"""MLflow bookkeeping: where runs are stored and the tags that tie a run to DVC and git.

The default store is `<project>/mlruns/mlflow.db` (SQLite) with artifacts beside it. DVC runs
queued and `--temp` experiments in a copy of the repository under `.dvc/tmp/exps/`, but sets
DVC_ROOT to the original project for them, so those runs land in the same store as the rest.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import yaml

from cxr.params import Params, as_flat_dict


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(configured: str) -> str:
    """params.yaml's mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the project store."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = project_root() / "mlruns"
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def use_experiment(params: Params) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    uri = tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///") and not params.mlflow.tracking_uri:
        artifacts = (project_root() / "mlruns" / "artifacts").as_uri()
    return mlflow.create_experiment(params.mlflow.experiment, artifact_location=artifacts)


def run_tags() -> dict[str, str]:
    """DVC experiment, git state and data hashes, so a run can be traced back to its inputs."""
    tags = {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "git.commit": _git("rev-parse", "HEAD"),
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))),
    }
    tags.update(data_hashes())
    return {k: v for k, v in tags.items() if v}


def data_hashes(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of each data output recorded in dvc.lock by the stages that already ran."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    hashes = {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out["path"].startswith("data/") and "md5" in out:
                hashes[f"dvc.md5.{out['path']}"] = out["md5"]
    return hashes


def log_params(params: Params) -> None:
    mlflow.log_params({k: str(v) for k, v in as_flat_dict(params).items()})


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return result.stdout.strip()


def reopen_training_run(params: Params, run_id: str) -> mlflow.ActiveRun:
    """The MLflow run that trained the model, so evaluation and explanations join its page.

    A model trained against another store gets a new run that names the missing one.
    """
    experiment_id = use_experiment(params)
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        print(f"MLflow run {run_id!r} is not in {mlflow.get_tracking_uri()}: logging to a new run")
        return mlflow.start_run(experiment_id=experiment_id, tags={"training_run_id": run_id})
    return mlflow.start_run(run_id=run_id)
