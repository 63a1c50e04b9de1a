"""The export stage's ONNX file: equal to PyTorch, self-describing, and safe when it is not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cxr.classifier import Classifier, decide
from cxr.model import ModelCard, create_model, save_model
from cxr.onnx_model import load_onnx
from cxr.predict import main as predict
from cxr.processed import load_split
from tests.conftest import run_stage_in_process, set_params, stage_argv, store_uri, tool_env


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("exported")
    folder = tmp / "project"
    shutil.copytree(trained, folder)
    # with flip TTA, so the ONNX side's mirrored pass is exercised and compared too
    set_params(folder, {"evaluate": {"flip_tta": True}})
    run_stage_in_process(folder, "evaluate", store_uri(tmp))
    out = run_stage_in_process(folder, "export", store_uri(tmp))
    assert "models/model.onnx: opset 18" in out
    return folder


def test_onnx_logits_equal_pytorch_on_the_test_split(exported: Path):
    report = json.loads((exported / "metrics/export.json").read_text())
    test_images = np.asarray(load_split("test", exported / "data/processed").images)
    assert report["images_checked"] == len(test_images)
    assert report["max_abs_logit_difference"] < 1e-4
    assert report["same_class"] == report["same_guard_verdict"] == 1.0
    assert report["max_rel_guard_score_difference"] < 1e-4
    assert report["opset"] == 18
    assert onnx.load(str(exported / "models/model.onnx")).opset_import[0].version == 18

    onnx_model = load_onnx(exported / "models/model.onnx")
    torch_model = Classifier.load(exported / "models/model.pt")
    assert onnx_model.card == torch_model.card  # the card and threshold travel in the file
    assert onnx_model.threshold == torch_model.threshold
    assert onnx_model.flip_tta is torch_model.flip_tta is True
    # the validation-fitted temperature too, and each form divides its own logit by it
    stored = json.loads((exported / "models/threshold.json").read_text())["temperature"]
    assert onnx_model.temperature == torch_model.temperature == stored == report["temperature"]
    assert report["max_abs_probability_difference"] < 1e-5
    assert onnx_model.ood_threshold == torch_model.ood_threshold  # the guard is in the graph
    # and the normalization: the graph takes the decoded pixels as they are
    assert onnx_model.backend.session.get_inputs()[0].type == "tensor(uint8)"
    noise = np.random.default_rng(0).integers(0, 256, test_images[:1].shape, dtype=np.uint8)
    for batch in (test_images[:1], np.concatenate([test_images[:4], noise])):  # dynamic batch
        onnx_answer, torch_answer = onnx_model.assess(batch), torch_model.assess(batch)
        np.testing.assert_allclose(onnx_answer.probability, torch_answer.probability, atol=1e-5)
        np.testing.assert_allclose(onnx_answer.ood_score, torch_answer.ood_score, rtol=1e-4)
        for answer in (onnx_answer, torch_answer):
            expected = 1 / (1 + np.exp(-answer.logit.astype(float) / stored))
            np.testing.assert_allclose(answer.probability, expected, atol=1e-6)
    assert onnx_answer.out_of_distribution[-1] and torch_answer.out_of_distribution[-1]
    onnx_model.flip_tta = False  # the mirrored pass is not a no-op on these images
    unflipped = onnx_model.assess(test_images[:4]).probability
    assert np.abs(unflipped - torch_model.assess(test_images[:4]).probability).max() > 1e-4


def test_cli_onnx_backend_gives_the_same_answers(exported: Path, capsys: pytest.CaptureFixture):
    files = [
        p
        for c in ("NORMAL", "PNEUMONIA")
        for p in sorted((exported / "data/raw/test" / c).iterdir())[:3]
    ]
    answers = {}
    for backend, model in (("torch", "model.pt"), ("onnx", "model.onnx")):
        argv = [*map(str, files), "--model", str(exported / "models" / model), "--no-cam"]
        assert predict([*argv, "--backend", backend]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]  # after the model line
        # label, or the guard's verdict; the numbers are compared apart, to a tolerance
        answers[backend] = [
            line.split("  ")[:3:2] if "p(pneumonia)" in line else line.split(": ")[0]
            for line in lines
        ]
        answers[f"{backend} p"] = [
            float(line.split("=")[1].split()[0]) for line in lines if "p(pneumonia)" in line
        ]
    assert answers["onnx"] == answers["torch"] and len(answers["onnx"]) == 6
    np.testing.assert_allclose(answers["onnx p"], answers["torch p"], atol=1e-4)


def test_export_beyond_tolerance_fails_and_keeps_no_file(trained: Path, tmp_path: Path):
    folder = tmp_path / "project"
    shutil.copytree(trained, folder)
    set_params(folder, {"export": {"tolerance": 1e-12}})
    result = subprocess.run(
        [sys.executable, "-m", "stages.export", *stage_argv(folder, "export")], cwd=folder,
        env=tool_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1
    assert "more than export.tolerance (1e-12)" in result.stderr
    assert not [p.name for p in (folder / "models").iterdir() if "onnx" in p.name]
    assert not (folder / "metrics/export.json").exists()


def test_the_stored_temperature_divides_the_logit(tmp_path: Path):
    """threshold.json's temperature reaches every probability the Classifier reports, after
    flip TTA; a file written before calibration existed means no temperature."""
    torch.manual_seed(0)
    card = ModelCard(arch="resnet10t", image_size=32, resize="pad", mean=0.5, std=0.25)
    save_model(tmp_path / "model.pt", create_model("resnet10t", "none"), card)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    (tmp_path / "threshold.json").write_text('{"threshold": 0.4, "flip_tta": true}')
    assert Classifier.load(tmp_path / "model.pt").temperature == 1.0
    (tmp_path / "threshold.json").write_text(
        '{"threshold": 0.4, "flip_tta": true, "temperature": 2.5}'
    )
    classifier = Classifier.load(tmp_path / "model.pt")
    assert classifier.temperature == 2.5
    with torch.no_grad():
        x = classifier.to_tensor(images)
        logit = ((classifier.model(x) + classifier.model(x.flip(-1))) / 2)[:, 0].double().numpy()

    answer = classifier.assess(images)

    np.testing.assert_allclose(answer.logit, logit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answer.probability, 1 / (1 + np.exp(-logit / 2.5)), atol=1e-6)
    assert np.abs(answer.probability - 1 / (1 + np.exp(-logit))).max() > 1e-3  # T matters here
    decisions = decide(classifier, images)  # what the CLI, pyfunc and page report
    assert [d.probability for d in decisions] == pytest.approx(answer.probability.tolist())
