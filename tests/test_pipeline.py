"""The train, evaluate and gradcam stages on tiny demo data, and the CLI on their model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxr import training
from cxr.classifier import Classifier, decide
from cxr.evaluation import choose_threshold, expected_calibration_error, fit_temperature
from cxr.explain import compute_cams, resolve_target_layer
from cxr.params import ParamsError, load_params
from cxr.predict import main as predict
from cxr.processed import load_split
from stages import gradcam, train
from stages.validate import Params
from tests.conftest import (
    TINY_ARCH,
    run_stage_in_process,
    set_params,
    stage_argv,
    store_uri,
    tool_env,
)


def _runs(store: Path) -> tuple[mlflow.MlflowClient, list]:
    """The MLflow client of a store and its runs, oldest first."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (experiment,) = client.search_experiments(filter_string="name = 'chest-xray-pneumonia'")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def _crash_in_the_second_validation(monkeypatch: pytest.MonkeyPatch):
    """Interrupt training after epoch 1's checkpoint; return the real `validate`."""
    original = training.validate
    calls = []

    def validate_then_crash(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(training, "validate", validate_then_crash)
    return original


def test_train_writes_model_metrics_and_history(trained: Path):
    summary = json.loads((trained / "metrics/train.json").read_text())
    history = pd.read_csv(trained / "plots/train/history.csv")
    assert summary["epochs_run"] == len(history) == 2
    assert summary["best_val_auc"] == pytest.approx(history["val_auc"].max(), abs=1e-5)
    assert (trained / "plots/train/history.png").stat().st_size > 0
    assert not (trained / "checkpoints/train.pt").exists()
    card = Classifier.load(trained / "models/model.pt").card
    assert (card.arch, card.image_size, card.resize) == (TINY_ARCH, 32, "pad")


def test_training_run_has_one_child_run_per_later_stage(trained: Path):
    client, (run, guard, evaluation, gradcam) = _runs(trained.parent / "mlflow.db")
    assert run.data.params["lr"] == "0.001"
    assert run.data.params["train.augment.hflip"] == "True"
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == 2
    assert run.info.run_id == Classifier.load(trained / "models/model.pt").card.mlflow_run_id
    assert "best_val_auc" in run.data.metrics and "test_roc_auc" not in run.data.metrics
    report = json.loads((trained / "metrics/evaluate.json").read_text())
    assert evaluation.data.metrics["test_roc_auc"] == report["test"]["roc_auc"]
    assert gradcam.data.metrics["gradcam_images_scored"] > 0
    guard_report = json.loads((trained / "metrics/guard.json").read_text())
    assert guard.data.metrics["guard_ood_auroc"] == guard_report["ood"]["auroc"]
    for child, stage in ((guard, "guard"), (evaluation, "evaluate"), (gradcam, "gradcam")):
        assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
        assert child.data.tags["dvc.stage"] == stage
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id)} == {"evaluation"}
    # The bare network from training; the deployable model from the evaluation that chose its
    # threshold.
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert {m.name: m.source_run_id for m in logged} == {
        "model": run.info.run_id,
        "xray_classifier": evaluation.info.run_id,
    }


def test_evaluate_outputs(trained: Path):
    report = json.loads((trained / "metrics/evaluate.json").read_text())
    threshold = json.loads((trained / "models/threshold.json").read_text())
    assert report["threshold"] == pytest.approx(threshold["threshold"], abs=1e-6)
    assert threshold["chosen_on"] == "validation"
    assert threshold["flip_tta"] is False
    for split in ("val", "test"):
        assert 0 <= report[split]["roc_auc"] <= 1
        assert report[split]["roc_auc_ci_low"] <= report[split]["roc_auc_ci_high"]
        for kind in ("roc", "pr", "calibration", "confusion"):
            assert (trained / f"plots/evaluate/{split}_{kind}.csv").is_file()
            assert (trained / f"plots/evaluate/figures/{split}_{kind}.png").is_file()
        for key in ("ece", "log_loss", "brier"):  # before and after calibration
            assert report[split][key] >= 0 and report[split][f"{key}_uncalibrated"] >= 0
        assert 0 <= report[split]["specificity_at_95_sensitivity"] <= 1
        before = pd.read_csv(trained / f"plots/evaluate/{split}_calibration_uncalibrated.csv")
        assert before["count"].sum() == report[split]["n"]
    # The older projects' protocol, labelled: no threshold does better on test than its own.
    notebook = report["test_notebook_protocol"]
    assert notebook["accuracy"] >= report["test"]["accuracy"]
    predictions = pd.read_csv(trained / "data/predictions.csv")
    test = predictions[predictions["split"] == "test"]
    assert len(test) == report["test"]["n"]
    positive = test["probability"] >= threshold["threshold"]
    assert (test["predicted"] == np.where(positive, "PNEUMONIA", "NORMAL")).all()


def test_evaluate_calibrates_on_validation_and_reports_before_and_after(trained: Path):
    """One temperature, fitted on validation logits, stored beside the threshold and applied
    to what every split reports; ECE and log loss are reported before and after it."""
    report = json.loads((trained / "metrics/evaluate.json").read_text())
    stored = json.loads((trained / "models/threshold.json").read_text())
    assert stored["calibration"] == "temperature"
    temperature = stored["temperature"]
    assert report["temperature"] == pytest.approx(temperature, abs=1e-6)
    classifier = Classifier.load(trained / "models/model.pt")
    assert classifier.temperature == temperature
    val = load_split("val", trained / "data/processed")
    deployed = classifier.assess(np.asarray(val.images))
    assert temperature == pytest.approx(fit_temperature(val.labels, deployed.logit), rel=1e-4)
    # the stored threshold is chosen on, and so lives among, the calibrated probabilities
    settings = load_params(Params, trained / "params.yaml").evaluate
    expected = choose_threshold(
        val.labels, deployed.probability, settings.threshold, settings.fixed_threshold,
        settings.target_sensitivity, settings.youden_tolerance,
    )  # fmt: skip
    assert stored["threshold"] == pytest.approx(expected, abs=1e-9)
    # T = 1 is among the candidates, so the fit cannot make validation log loss worse
    assert report["val"]["log_loss"] <= report["val"]["log_loss_uncalibrated"] + 1e-5

    predictions = pd.read_csv(trained / "data/predictions.csv")
    for split in ("val", "test"):
        rows = predictions[predictions["split"] == split]
        labels = (rows["label"] == "PNEUMONIA").to_numpy(int)
        probs = rows["probability"].to_numpy()
        assert report[split]["ece"] == pytest.approx(
            expected_calibration_error(labels, probs, 10), abs=1e-4
        )
        # undo the temperature: the probabilities before calibration
        raw = 1 / (1 + np.exp(-temperature * np.log(probs / (1 - probs))))
        assert report[split]["ece_uncalibrated"] == pytest.approx(
            expected_calibration_error(labels, raw, 10), abs=1e-4
        )


def test_evaluate_reports_what_the_deployed_model_does(trained: Path):
    """The share of test X-rays the guard refuses, and the metrics on the ones it accepts, as
    the deployed classifier (network, threshold and guard from models/) computes them."""
    report = json.loads((trained / "metrics/evaluate.json").read_text())
    classifier = Classifier.load(trained / "models/model.pt")
    test = load_split("test", trained / "data/processed")
    deployed = classifier.assess(np.asarray(test.images))
    refused = deployed.out_of_distribution
    assert refused.any() and not refused.all()  # the tiny model's guard refuses a few
    assert report["test"]["refused"] == pytest.approx(refused.mean(), abs=1e-6)
    assert report["test"]["refused_n"] == refused.sum()
    accepted = report["test_accepted"]
    assert accepted["n"] == report["test"]["n"] - refused.sum()
    temperature = json.loads((trained / "models/threshold.json").read_text())["temperature"]
    np.testing.assert_allclose(
        deployed.probability, 1 / (1 + np.exp(-deployed.logit.astype(float) / temperature)),
        atol=1e-6,
    )  # fmt: skip
    labels, probs = test.labels[~refused], deployed.probability[~refused]
    assert accepted["roc_auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-5)
    predicted = probs >= classifier.threshold
    assert accepted["accuracy"] == pytest.approx((predicted == labels).mean(), abs=1e-5)
    assert accepted["patients"] == test.index["patient_id"][~refused].nunique()
    assert accepted["roc_auc_ci_low"] <= accepted["roc_auc"] <= accepted["roc_auc_ci_high"]
    assert report["val_accepted"]["n"] == report["val"]["n"] - report["val"]["refused_n"]
    predictions = pd.read_csv(trained / "data/predictions.csv").query("split == 'test'")
    assert predictions["refused"].tolist() == refused.tolist()


def test_gradcam_outputs_and_maps(trained: Path):
    report = json.loads((trained / "metrics/gradcam.json").read_text())
    assert report["target_layer"] == "layer3"
    # A seeded sample of 8 test images from both classes, not the first (all NORMAL) rows.
    test_labels = load_split("test", trained / "data/processed").labels
    assert len(test_labels) > 8 and 0 < test_labels.mean() < 1
    assert report["images_scored"] == 8
    assert report["scored_normal"] >= 1 and report["scored_pneumonia"] >= 1
    assert report["scored_normal"] + report["scored_pneumonia"] == 8
    assert report["lesions_scored"] == report["scored_pneumonia"]  # every demo lesion has a box
    hits = report["pointing_game"] * report["lesions_scored"]
    assert hits == pytest.approx(round(hits), abs=1e-3)  # a share of the scored lesions
    pictures = sorted(p.name for p in (trained / "plots/gradcam").glob("*.png"))
    assert "montage.png" in pictures
    assert any(name.startswith(("TP_", "FN_")) for name in pictures)

    classifier = Classifier.load(trained / "models/model.pt")
    images = np.asarray(load_split("test", trained / "data/processed").images[:4])
    layer = resolve_target_layer(classifier.model, "layer3")
    cams = compute_cams(classifier.model, classifier.to_tensor(images), "gradcam", layer)
    assert cams.shape == images.shape


def test_cli_explains_files_and_folders_and_reports_bad_ones(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    classifier = Classifier.load(trained / "models/model.pt")
    for label in ("NORMAL", "PNEUMONIA"):  # one of each that the input guard lets through
        files = sorted((trained / "data/raw/test" / label).iterdir())
        decisions = decide(classifier, np.stack([classifier.load_image(f) for f in files]))
        source = next(f for f, d in zip(files, decisions, strict=True) if d.in_distribution)
        shutil.copy(source, inbox / source.name)
    (inbox / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    model = str(trained / "models/model.pt")
    single = next(inbox.glob("person*"))
    assert predict([str(single), "--model", model]) == 0
    out = capsys.readouterr().out
    assert f"{single}  p(pneumonia)=" in out
    assert (inbox / f"{single.stem}_gradcam.png").is_file()

    assert predict([str(inbox), "--model", model, "--out", str(tmp_path / "cams")]) == 1
    captured = capsys.readouterr()
    assert f"error: {inbox / 'corrupt.jpeg'}: " in captured.err
    assert captured.out.count("p(pneumonia)=") == 2
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 2


def test_interrupted_training_resumes_to_the_same_model(
    trained: Path, prepared_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    folder = tmp_path / "project"
    shutil.copytree(prepared_project, folder)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    original = _crash_in_the_second_validation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.main(stage_argv(folder, "train"))
    saved = torch.load("checkpoints/train.pt", weights_only=True)  # tensors and plain data
    assert saved["progress"]["epoch"] == 1
    assert not Path("models/model.pt").exists()

    monkeypatch.setattr(training, "validate", original)
    torch.manual_seed(1234)  # a resumed run must not depend on the process's random state
    train.main(stage_argv(folder, "train"))
    assert "resuming after epoch 1" in capsys.readouterr().out
    # The same weights, to the bit, as the uninterrupted run of the `trained` fixture.
    resumed = torch.load("models/model.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(trained / "models/model.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    history = pd.read_csv("plots/train/history.csv")
    expected = pd.read_csv(trained / "plots/train/history.csv")
    pd.testing.assert_frame_equal(
        history.drop(columns="images_per_s"), expected.drop(columns="images_per_s")
    )
    client, (run,) = _runs(tmp_path / "mlflow.db")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]


def test_a_checkpoint_whose_run_left_the_store_resumes_into_a_new_run(
    prepared_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    folder = tmp_path / "project"
    shutil.copytree(prepared_project, folder)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'first.db'}")
    _crash_in_the_second_validation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.main(stage_argv(folder, "train"))
    interrupted = torch.load("checkpoints/train.pt", weights_only=True)["mlflow_run_id"]

    monkeypatch.undo()  # the original validate; then a store that never saw the run
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'second.db'}")
    train.main(stage_argv(folder, "train"))
    assert f"MLflow run {interrupted!r} of the checkpoint is not in" in capsys.readouterr().out
    _, (run,) = _runs(tmp_path / "second.db")
    assert run.info.run_id != interrupted
    assert run.data.tags["resumed_from_run_id"] == interrupted
    assert run.data.params["lr"] == "0.001"  # a new run gets the params
    assert Path("models/model.pt").exists()


def test_threshold_is_chosen_without_reading_test_labels(trained: Path, tmp_path: Path):
    folder = tmp_path / "project"
    shutil.copytree(trained, folder)
    index_file = folder / "data/processed/index.csv"
    index = pd.read_csv(index_file, keep_default_na=False)
    is_test = index["split"] == "test"
    swapped = {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}
    index.loc[is_test, "label"] = index.loc[is_test, "label"].map(swapped)
    index.to_csv(index_file, index=False)
    run_stage_in_process(folder, "evaluate", store_uri(tmp_path))

    before = json.loads((trained / "metrics/evaluate.json").read_text())
    after = json.loads((folder / "metrics/evaluate.json").read_text())
    assert after["threshold"] == before["threshold"]
    assert after["temperature"] == before["temperature"]
    assert after["val"] == before["val"]
    assert after["test"]["roc_auc"] == pytest.approx(1 - before["test"]["roc_auc"], abs=1e-4)


def test_flip_tta_is_scored_and_stored_for_inference(trained: Path, tmp_path: Path):
    folder = tmp_path / "project"
    shutil.copytree(trained, folder)
    set_params(folder, {"evaluate": {"flip_tta": True}})
    run_stage_in_process(folder, "evaluate", store_uri(trained.parent))  # the same store

    assert json.loads((folder / "models/threshold.json").read_text())["flip_tta"] is True
    classifier = Classifier.load(folder / "models/model.pt")
    assert classifier.flip_tta
    test_images = np.asarray(load_split("test", folder / "data/processed").images)
    stored = pd.read_csv(folder / "data/predictions.csv").query("split == 'test'")
    plain = pd.read_csv(trained / "data/predictions.csv").query("split == 'test'")
    expected = classifier.predict_proba(test_images)
    np.testing.assert_allclose(stored["probability"], expected, atol=2e-6)
    assert not np.allclose(stored["probability"], plain["probability"], atol=1e-4)
    # A re-evaluation of a cached model is a new record; the first evaluation keeps its numbers.
    _, runs = _runs(trained.parent / "mlflow.db")
    evaluations = [r for r in runs if r.data.tags.get("dvc.stage") == "evaluate"]
    assert len(evaluations) == 2
    first, second = evaluations
    assert first.data.tags["evaluate.flip_tta"] == "False"
    assert second.data.tags["evaluate.flip_tta"] == "True"
    report = json.loads((trained / "metrics/evaluate.json").read_text())
    assert first.data.metrics["test_roc_auc"] == report["test"]["roc_auc"]


def test_single_class_validation_split_is_a_clear_error(prepared_project: Path, tmp_path: Path):
    folder = tmp_path / "project"
    shutil.copytree(prepared_project, folder)
    index_file = folder / "data/processed/index.csv"
    index = pd.read_csv(index_file, keep_default_na=False)
    index.loc[index["split"] == "val", "label"] = "PNEUMONIA"
    index.to_csv(index_file, index=False)
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", *stage_argv(folder, "train")], cwd=folder,
        env=tool_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: the val split holds only one class (PNEUMONIA)" in result.stderr


def test_unknown_gradcam_layer_stops_before_any_work(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = tmp_path / "project"
    shutil.copytree(trained, folder)
    set_params(folder, {"gradcam": {"target_layer": "features.denseblock9"}})
    monkeypatch.chdir(folder)
    before = (folder / "metrics/gradcam.json").read_text()
    with pytest.raises(ParamsError, match=r"^gradcam.target_layer: .*'features.denseblock9'"):
        gradcam.main(stage_argv(folder, "gradcam"))
    assert (folder / "metrics/gradcam.json").read_text() == before
    model = str(folder / "models/model.pt")
    image = next((folder / "data/raw/test/NORMAL").iterdir())
    assert predict([str(image), "--model", model, "--target-layer", "features.nope"]) == 2
