"""The training checkpoint is data, never code: resuming loads it with `weights_only`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxr import trainer
from cxr.checkpoint import load_resumable
from cxr.params import load_params
from cxr.stage import StageError
from cxr.training import Params
from tests.conftest import REPO

CHECKPOINT = trainer.CHECKPOINTS / "train.pt"  # the train stage's


class Planted:
    """An object whose unpickling touches a file: what a tampered checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (self.marker,)


@pytest.fixture
def resuming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    monkeypatch.chdir(tmp_path)
    trainer.CHECKPOINTS.mkdir()
    params = load_params(Params, REPO / "params.yaml")
    assert params.runtime.resume
    return params


def test_a_checkpoint_holding_code_is_refused_not_run(resuming: Params, tmp_path: Path):
    marker = tmp_path / "ran"
    torch.save({"fingerprint": "x", "progress": Planted(marker)}, CHECKPOINT)

    with pytest.raises(StageError, match="holds more than tensors and plain data"):
        load_resumable(CHECKPOINT, resuming, "x")

    assert not marker.exists()


def test_a_checkpoint_of_tensors_and_plain_data_resumes(resuming: Params):
    saved = {
        "fingerprint": "x",
        "progress": {"epoch": 1, "best_score": -float("inf"), "history": [{"frozen": True}]},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": None,
    }
    torch.save(saved, CHECKPOINT)

    loaded = load_resumable(CHECKPOINT, resuming, "x")

    assert loaded is not None and loaded["progress"] == saved["progress"]
    assert torch.equal(loaded["torch_rng"], saved["torch_rng"])
    assert load_resumable(CHECKPOINT, resuming, "other inputs") is None
