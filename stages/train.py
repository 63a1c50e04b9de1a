"""Train the timm classifier on the preprocessed arrays; record the run in MLflow.

Outputs: models/model.pt (best validation-AUC epoch), metrics/train.json, plots/train/.
An interrupted run resumes from checkpoints/train.pt when `train.resume` is true.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature

from cxr import tracking
from cxr.atomic import atomic_path, write_csv, write_json
from cxr.model import ModelCard, create_model, save_model
from cxr.params import Params, as_flat_dict, load_params
from cxr.processed import PROCESSED_DIR, load_split, load_stats
from cxr.stage import StageError, run
from cxr.training import DeviceData, EpochRecord, Trainer, TrainState, pick_device, save_checkpoint

MODEL_FILE = Path("models/model.pt")
CHECKPOINT = Path("checkpoints/train.pt")
METRICS_FILE = Path("metrics/train.json")
HISTORY_CSV = Path("plots/train/history.csv")
HISTORY_PNG = Path("plots/train/history.png")
# Settings that do not change what is learned; a checkpoint stays valid when they change.
_RUN_ONLY_KEYS = (
    "train.resume", "train.threads", "train.compile", "mlflow.", "evaluate.", "gradcam.",
)  # fmt: skip


def fingerprint(params: Params) -> str:
    """Identifies the training inputs, so a checkpoint is resumed only by the run it came from."""
    relevant = {k: v for k, v in as_flat_dict(params).items() if not k.startswith(_RUN_ONLY_KEYS)}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    for name in ("index.csv", "stats.json"):
        digest.update((PROCESSED_DIR / name).read_bytes())
    return digest.hexdigest()


def load_resumable(params: Params, fingerprint_now: str) -> dict | None:
    if not (params.train.resume and CHECKPOINT.is_file()):
        return None
    saved = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)
    if saved.get("fingerprint") != fingerprint_now:
        print(f"{CHECKPOINT} comes from other params or data: starting afresh")
        return None
    return saved


def save_history(history: list[EpochRecord]) -> pd.DataFrame:
    table = pd.DataFrame([asdict(r) for r in history])
    write_csv(HISTORY_CSV, table)
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(table["epoch"], table["train_loss"], marker="o", label="train")
    ax_loss.plot(table["epoch"], table["val_loss"], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_auc.plot(table["epoch"], table["val_auc"], marker="o", color="tab:green")
    ax_auc.set(xlabel="epoch", ylabel="ROC-AUC", title="Validation ROC-AUC")
    fig.tight_layout()
    with atomic_path(HISTORY_PNG) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return table


def summarize(state: TrainState, history: pd.DataFrame, wall_time: float) -> dict:
    """metrics/train.json: small and flat, to read in `dvc metrics diff`."""
    best = history.loc[history["epoch"] == state.best_epoch].iloc[0]
    return {
        "best_epoch": int(state.best_epoch),
        "best_val_auc": round(float(state.best_auc), 5),
        "best_val_loss": round(float(best["val_loss"]), 5),
        "epochs_run": int(state.epoch),
        "wall_time_s": round(wall_time, 1),
        "train_images_per_s": round(float(history["images_per_s"].mean()), 1),
    }


def log_model_to_mlflow(model: torch.nn.Module, image_size: int) -> None:
    """The best model as an MLflow PyTorch model, with its input/output signature."""
    model = model.cpu().eval()
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


def main() -> None:
    params = load_params()
    torch.manual_seed(params.seed)
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    device = pick_device(params.train.device)
    stats = load_stats()
    train_split, val_split = load_split("train"), load_split("val")
    for name, split in (("train", train_split), ("val", val_split)):
        if len(np.unique(split.labels)) < 2:
            raise StageError(
                f"the {name} split holds only one class ({split.index['label'].iloc[0]}); "
                "ROC-AUC and early stopping need both: use more data or a larger "
                "split.val_fraction"
            )
    model = create_model(params.model.arch, params.model.pretrained, params.model.drop_rate)

    positives = int(train_split.labels.sum())
    negatives = len(train_split.labels) - positives
    # Weighting positives by NORMAL/PNEUMONIA makes both classes weigh the same in the loss.
    pos_weight = negatives / positives if params.train.imbalance == "pos_weight" else 1.0
    trainer = Trainer(model, params, device, stats["mean"], stats["std"], pos_weight)
    train = DeviceData.from_arrays(train_split.images, train_split.labels, device)
    val = DeviceData.from_arrays(val_split.images, val_split.labels, device)
    trainer.make_scheduler(steps_per_epoch=-(-len(train.labels) // params.batch_size))

    run_fingerprint = fingerprint(params)
    saved = load_resumable(params, run_fingerprint)
    state = trainer.restore(saved) if saved else TrainState()
    print(
        f"training {params.model.arch} on {device} ({len(train.labels)} train: {negatives} "
        f"NORMAL / {positives} PNEUMONIA, {len(val.labels)} val), pos_weight {pos_weight:.3f}, "
        f"AdamW lr={trainer.optimizer.param_groups[0]['initial_lr']!r}"
        + (f", resuming after epoch {state.epoch}" if saved else "")
    )

    experiment_id = tracking.use_experiment(params)
    started = time.perf_counter()
    with mlflow.start_run(
        run_id=saved["mlflow_run_id"] if saved else None, experiment_id=experiment_id
    ) as active:
        if not saved:
            tracking.log_params(params)
        mlflow.set_tags(tracking.run_tags())

        def on_epoch_end(record: EpochRecord, state: TrainState) -> None:
            metrics = {k: v for k, v in asdict(record).items() if k not in ("epoch", "frozen")}
            mlflow.log_metrics(metrics, step=record.epoch)
            checkpoint = trainer.checkpoint(state)
            checkpoint.update(fingerprint=run_fingerprint, mlflow_run_id=active.info.run_id)
            save_checkpoint(CHECKPOINT, checkpoint)

        state = trainer.fit(train, val, state, on_epoch_end)
        wall_time = time.perf_counter() - started

        model.load_state_dict(state.best_state)
        card = ModelCard(
            arch=params.model.arch,
            image_size=params.image_size,
            resize=params.preprocess.resize,
            mean=stats["mean"],
            std=stats["std"],
            mlflow_run_id=active.info.run_id,
        )
        save_model(MODEL_FILE, model, card)
        summary = summarize(state, save_history(state.history), wall_time)
        write_json(METRICS_FILE, summary)
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(HISTORY_PNG), artifact_path="plots")
        log_model_to_mlflow(model, params.image_size)
    CHECKPOINT.unlink(missing_ok=True)
    print(f"best epoch {state.best_epoch}: val AUC {state.best_auc:.4f} -> {MODEL_FILE}")


if __name__ == "__main__":
    run(main)
