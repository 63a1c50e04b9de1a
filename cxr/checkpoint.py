"""The training checkpoint: a plain dict of tensors and plain data, written after each epoch
so an interrupted run continues exactly where it stopped (`runtime.resume`).

A checkpoint is resumed only by the run it came from (`fingerprint`), and loaded with
`weights_only`: a file holding anything else, which unpickling would run as code, is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch

from cxr.atomic import atomic_path
from cxr.params import RUN_ONLY_SECTIONS, as_flat_dict
from cxr.stage import StageError
from cxr.training import Params, Run


def checkpoint(run: Run, progress: dict) -> dict:
    """A plain dict with everything an interrupted run needs to continue exactly."""
    return {
        "progress": progress,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "ema": None if run.ema is None else run.ema.state_dict(),
        "scaler": None if run.scaler is None else run.scaler.state_dict(),
        "order_rng": run.order_rng.get_state(),
        "augment_rng": run.augment_rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore(run: Run, saved: dict) -> dict:
    """Put a checkpoint's state back into `run`; returns its progress."""
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(saved["ema"])
    if run.scaler is not None:
        run.scaler.load_state_dict(saved["scaler"])
    run.order_rng.set_state(saved["order_rng"])
    run.augment_rng.set_state(saved["augment_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return saved["progress"]


def save_checkpoint(path: Path, saved: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)


def fingerprint(params: Params, processed: Path, *input_sha256: str) -> str:
    """Identifies the training inputs (params, data, and the content hashes of the weights and
    teacher it started from), so a checkpoint is resumed only by the run it came from."""
    relevant = {
        k: v for k, v in as_flat_dict(params).items() if k.split(".")[0] not in RUN_ONLY_SECTIONS
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    for name in ("index.csv", "stats.json"):
        digest.update((processed / name).read_bytes())
    for sha256 in input_sha256:
        digest.update(sha256.encode())
    return digest.hexdigest()


def load_resumable(path: Path, params: Params, fingerprint_now: str) -> dict | None:
    """The checkpoint an interrupted run of these inputs left, if resuming is on.

    A checkpoint holds tensors and plain data only (`checkpoint`), so it is loaded with
    `weights_only`: a file holding anything else, which unpickling would run as code, is
    refused instead of executed.
    """
    if not (params.runtime.resume and path.is_file()):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise StageError(
            f"{path} holds more than tensors and plain data ({reason}): not loaded; "
            "delete it to train afresh"
        ) from None
    if saved.get("fingerprint") != fingerprint_now:
        print(f"{path} comes from other params or data: starting afresh")
        return None
    return saved
