"""MLflow bookkeeping: where runs are stored and the tags that tie a run to DVC and git.

The default store is `<project>/mlruns/mlflow.db` (SQLite) with artifacts beside it. DVC runs
queued and `--temp` experiments in a copy of the repository under `.dvc/tmp/exps/`, but sets
DVC_ROOT to the original project for them, so those runs land in the same store as the rest.

`dvc queue start -j N` runs several stages at once against that store, so opening it and getting
the experiment are made safe for concurrent processes, and each evaluate or gradcam execution
writes to a run of its own (a child of the training run) instead of rewriting the training run.

This module takes plain values (names, URIs, flat dicts) so it does not depend on how the
params are modelled.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from filelock import FileLock
from mlflow.entities import LifecycleStage, Run
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from torch import nn

from cxr.stage import project_root

# Creating the SQLite schema runs every alembic migration, which takes seconds; a generous bound
# still turns a wedged lock holder into an error instead of a stage that hangs forever.
STORE_LOCK_TIMEOUT_S = 300.0


def tracking_uri(configured: str) -> str:
    """params.yaml's mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the project store."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = _default_store()
    store.mkdir(exist_ok=True)
    return _sqlite_uri(store)


def use_experiment(experiment: str, configured_uri: str) -> str:
    """Point MLflow at the store and get or create `experiment`; return its id.

    Safe when several stage processes do it at once: on a SQLite store a file lock beside the
    database covers the first connection (which creates or migrates the schema: two processes
    doing that at once fail in alembic) and the look-up-then-create; on any store (a team's
    tracking server) a create that loses the race re-reads the experiment the winner made.
    """
    uri = tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return _get_or_create_experiment(mlflow.MlflowClient(uri), experiment, None)
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    store = _default_store()
    artifacts = (store / "artifacts").as_uri() if uri == _sqlite_uri(store) else None
    with FileLock(f"{database}.lock", timeout=STORE_LOCK_TIMEOUT_S):
        # Creating the client opens the store: the first time in a process, that connects and
        # creates or migrates the schema (later clients reuse the process's cached store).
        client = mlflow.MlflowClient(uri)
        return _get_or_create_experiment(client, experiment, artifacts)


def start_stage_run(
    experiment: str, configured_uri: str, training_run_id: str, stage: str
) -> mlflow.ActiveRun:
    """A new run for one execution of `stage`, nested under the run that trained the model.

    A fresh run per execution keeps the training run as it was when the model was made: DVC
    reuses a cached train stage across experiments, so logging into the training run would let
    each new evaluation overwrite the last one's metrics, and two queued experiments could
    write into one run. The child sits in the training run's experiment so MLflow shows it
    under its parent. A model trained against another store gets a top-level run in
    `experiment` that names the missing run.
    """
    experiment_id = use_experiment(experiment, configured_uri)
    tags = {**run_tags(), "dvc.stage": stage}
    if training_run_id:
        tags["training_run_id"] = training_run_id
    parent = _training_run(mlflow.MlflowClient(mlflow.get_tracking_uri()), training_run_id)
    if parent is None:
        print(
            f"MLflow run {training_run_id!r} is not in {mlflow.get_tracking_uri()}: "
            f"logging {stage} to a new top-level run"
        )
        return mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags)
    return mlflow.start_run(
        experiment_id=parent.info.experiment_id,
        run_name=stage,
        parent_run_id=parent.info.run_id,
        tags=tags,
    )


def resumable_run(run_id: str | None) -> str | None:
    """The interrupted training run to continue, or None to start a new one.

    A checkpoint outlives its store when the store is deleted or the tracking URI changes
    between the interruption and the resume; the weights still resume, and the rest of the
    training goes to a new run that says which run it continues.
    """
    if _training_run(mlflow.MlflowClient(mlflow.get_tracking_uri()), run_id or "") is not None:
        return run_id
    if run_id:
        print(
            f"MLflow run {run_id!r} of the checkpoint is not in {mlflow.get_tracking_uri()}: "
            "logging the resumed training to a new run"
        )
    return None


def run_tags() -> dict[str, str]:
    """DVC experiment, git state and data hashes, so a run can be traced back to its inputs.

    `git.dirty` says whether the code and params that ran differ from `git.commit`: tracked
    files other than the pipeline's own outputs (see `changed_sources`) differ from HEAD, and
    `git.changed` names them. Under `dvc exp run -S`, DVC writes the set values into
    params.yaml first, so such a run is dirty (`git.changed` params.yaml) and `dvc.exp_name`
    names the experiment whose commit holds exactly what ran. Outside a git repository, or
    before its first commit, there is no commit to compare with and no git tags at all.
    """
    tags = {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
    }
    commit = _git("rev-parse", "--verify", "HEAD")
    changed = changed_sources() if commit else None
    if commit and changed is not None:
        tags["git.commit"] = commit
        tags["git.dirty"] = str(bool(changed))
        tags["git.changed"] = _listing(changed)
    tags.update(data_hashes())
    return {k: v for k, v in tags.items() if v}


def changed_sources(pipeline_file: Path = Path("dvc.yaml")) -> list[str] | None:
    """Tracked files under the project folder that differ from HEAD, less what the pipeline
    writes itself; None if git cannot tell.

    The outputs declared in dvc.yaml that git tracks (metrics, plots and models/threshold.json
    are `cache: false`) and dvc.lock are rewritten by every `dvc repro`, before evaluate
    registers its model: counting them would call every run dirty. Untracked files do not count
    (a new module is tracked once it is added). Paths are relative to the folder the stage runs
    in, the one holding dvc.yaml, as `git diff --relative` gives them.
    """
    listed = _git("diff", "HEAD", "--name-only", "--no-renames", "--relative", "-z")
    if listed is None:
        return None
    written = pipeline_outputs(pipeline_file) | {"dvc.lock"}
    # DVC keeps a .gitignore beside the outputs it caches (data/members/.gitignore).
    folders = {posixpath.dirname(out) for out in written}
    return [
        path
        for path in listed.split("\0")
        if path
        and not any(path == out or path.startswith(f"{out}/") for out in written)
        and not (posixpath.basename(path) == ".gitignore" and posixpath.dirname(path) in folders)
    ]


def pipeline_outputs(pipeline_file: Path = Path("dvc.yaml")) -> set[str]:
    """Every path dvc.yaml declares as written by the pipeline: each stage's outs, metrics and
    plots (a folder stands for everything under it), and the top-level metrics and plots."""
    if not pipeline_file.is_file():
        return set()
    pipeline = yaml.safe_load(pipeline_file.read_text()) or {}
    found = set(_paths(pipeline.get("metrics", [])))
    for entry in pipeline.get("plots", []):
        if isinstance(entry, dict):  # {id: config}: the id, or the files its x and y name
            for plot_id, config in entry.items():
                found.add(plot_id)
                for axis in ("x", "y"):
                    value = (config or {}).get(axis)
                    found.update(value if isinstance(value, dict) else [])
        else:
            found.add(entry)
    for stage in _expanded_stages(pipeline, pipeline_file.parent):
        wdir = stage.get("wdir", ".")
        for kind in ("outs", "metrics", "plots"):
            found.update(posixpath.join(wdir, path) for path in _paths(stage.get(kind, [])))
    return {posixpath.normpath(path) for path in found}


def _expanded_stages(pipeline: dict, folder: Path) -> list[dict]:
    """dvc.yaml's stages, a `foreach` stage once per item (its `${key}` filled in), the items
    being a literal list or dict or a params.yaml entry named `${name}`."""
    stages = []
    for stage in (pipeline.get("stages") or {}).values():
        if "foreach" not in stage:
            stages.append(stage)
            continue
        items = stage["foreach"]
        if isinstance(items, str):  # ${members}
            params = yaml.safe_load((folder / "params.yaml").read_text()) or {}
            items = params.get(items.removeprefix("${").removesuffix("}"), {})
        definition = yaml.safe_dump(stage["do"])
        for key in items:
            stages.append(yaml.safe_load(definition.replace("${key}", str(key))))
    return stages


def _paths(entries: list) -> list[str]:
    """Paths of dvc.yaml output entries: `path` or `{path: {options}}`."""
    return [p for entry in entries for p in (entry if isinstance(entry, dict) else [entry])]


def _listing(paths: list[str], limit: int = 1000) -> str:
    """Comma-separated paths, cut short to stay well within MLflow's tag value limit."""
    text = ", ".join(paths)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(paths)} files)"


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


def log_pytorch_model(model: nn.Module, image_size: int) -> None:
    """The best model as an MLflow PyTorch model, with its input/output signature."""
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    example = np.zeros((1, 1, image_size, image_size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm"],
    )


def log_params(params: Mapping[str, object]) -> None:
    """Log flat `dotted.key: value` params as strings, the form MLflow stores anyway."""
    mlflow.log_params({k: str(v) for k, v in params.items()})


def _default_store() -> Path:
    return project_root() / "mlruns"


def _sqlite_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def _get_or_create_experiment(
    client: mlflow.MlflowClient, name: str, artifact_location: str | None
) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        # Another process created it between our look-up and our create (a shared server, or a
        # store no lock covers): use theirs.
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    found = client.get_experiment_by_name(name)
    if found is None:
        raise MlflowException(f"experiment {name!r} exists but cannot be read back")
    return found.experiment_id


def _training_run(client: mlflow.MlflowClient, run_id: str) -> Run | None:
    """The training run if this store holds it (and it is not deleted), else None."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return None
    return run if run.info.lifecycle_stage == LifecycleStage.ACTIVE else None


def _git(*args: str) -> str | None:
    """git's output in the current folder, stripped; None if git is missing or fails."""
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()
