"""Ensemble members, their ensemble and distillation into the train stage's network."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score

from cxr.atomic import sha256_of
from cxr.checkpoint import fingerprint
from cxr.distill import DistillationLoss, DistillParams
from cxr.model import create_model
from cxr.params import ParamsError, load_params
from cxr.processed import load_split
from cxr.stage import StageError
from cxr.training import Params as TrainingParams
from cxr.training import create_run, predict_logits, train_groups_of_epoch, train_one_epoch
from stages import ensemble, member
from stages.train import read_teacher
from stages.validate import Params as WholeFile
from tests.conftest import MEMBER_STAGES, REPO, set_params, stage_argv
from tests.test_training import CPU, _squares

LABEL_LOSS = torch.nn.BCEWithLogitsLoss()


def test_distillation_loss_is_the_label_loss_at_weight_0_and_the_teacher_s_at_weight_1():
    logits = torch.tensor([-1.0, 0.5, 3.0])
    labels = torch.tensor([0.0, 1.0, 1.0])
    teacher = torch.tensor([-2.0, -1.0, 4.0])
    targets = torch.stack([labels, teacher], 1)
    assert DistillationLoss(LABEL_LOSS, 2.0, 0.0)(logits, targets) == LABEL_LOSS(logits, labels)
    soft = F.binary_cross_entropy_with_logits(logits / 2, torch.sigmoid(teacher / 2))
    assert DistillationLoss(LABEL_LOSS, 2.0, 1.0)(logits, targets) == pytest.approx(4 * soft)
    half = DistillationLoss(LABEL_LOSS, 2.0, 0.5)(logits, targets)
    assert half == pytest.approx(0.5 * LABEL_LOSS(logits, labels) + 0.5 * 4 * soft)
    # The soft term is least where the student's logit is the teacher's.
    student = teacher.clone().requires_grad_()
    DistillationLoss(LABEL_LOSS, 3.0, 1.0)(student, targets).backward()
    assert torch.allclose(student.grad, torch.zeros(3), atol=1e-6)


def _student(weight: float, teacher: torch.Tensor) -> tuple[float, list[float]]:
    """A network trained on flipped labels with the teacher's logits beside them, `weight` of
    the loss from the teacher: its AUC against the true labels, and each epoch's mean loss."""
    params = load_params(TrainingParams, REPO / "params.yaml")
    params = params.model_copy(update={"batch_size": 16, "lr": 2e-3, "epochs": 4})
    data = _squares(64, seed=0)
    truth = data.labels.clone()
    data.labels = 1 - truth  # the labels lie; only the teacher knows
    torch.manual_seed(0)
    run = create_run(create_model("resnet10t", "none"), params, CPU, 4, compile=False)
    loss = DistillationLoss(LABEL_LOSS, 2.0, weight)
    losses = []
    for epoch in range(1, 5):
        train_groups_of_epoch(run.model, epoch, params.train)
        losses.append(train_one_epoch(run, data, params, CPU, loss, epoch, teacher)[0])
    scores = predict_logits(run.model, data, CPU, 32)
    return roc_auc_score(truth.numpy(), scores.numpy()), losses


def test_the_student_learns_each_image_s_teacher_logit_through_the_batches():
    """Against labels that lie, a student that learns from the teacher alone follows the
    teacher, image by image. Paired with other images' teacher logits (rows mixed up, as a
    loop that indexed the teacher by batch position would pair them), it learns nothing."""
    truth = _squares(64, seed=0).labels
    teacher = 8.0 * truth - 4.0  # a sure and right teacher
    # The least the loss can be: T^2 x the entropy of the softened teacher, sigmoid(4 / T).
    p = torch.sigmoid(torch.tensor(4.0 / 2.0))
    floor = 4 * float(-(p * p.log() + (1 - p) * (1 - p).log()))
    auc, losses = _student(1.0, teacher)
    assert auc > 0.9 and losses[-1] - floor < 0.5 * (losses[0] - floor)
    assert _student(0.0, teacher)[0] < 0.1  # the labels alone: it learns the lie
    mixed = teacher[torch.randperm(64, generator=torch.Generator().manual_seed(5))]
    _, losses = _student(1.0, mixed)
    assert losses[-1] - floor > 0.8 * (losses[0] - floor)


def _whole(changes: dict | None = None) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in (changes or {}).items():
        raw[key] = value
    return raw


def test_a_member_trains_with_its_own_network_and_schedule_and_the_shared_rest(tmp_path: Path):
    raw = _whole()
    raw["lr"], raw["seed"] = 0.123, 77  # the deployed network's: no member reads them
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = member.training_params(load_params(member.Params, tmp_path / "params.yaml"), "lite0")
    own = raw["members"]["lite0"]
    assert (params.lr, params.seed, params.epochs) == (own["lr"], own["seed"], own["epochs"])
    assert params.model.arch == own["arch"] == "tf_efficientnet_lite0"
    assert params.model.pretrained == own["pretrained"]
    assert params.train.freeze_epochs == own["freeze_epochs"]
    assert params.train.head_lr == own["head_lr"]
    assert params.train.augment.rotation_deg == raw["train"]["augment"]["rotation_deg"]
    assert params.train.patience == raw["train"]["patience"]
    assert params.batch_size == raw["batch_size"]
    assert params.train.precision == raw["train"]["precision"]  # inherited unless it says
    raw["train"]["precision"], raw["members"]["lite0"]["precision"] = "bf16", "fp32"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = member.training_params(load_params(member.Params, tmp_path / "params.yaml"), "lite0")
    assert params.train.precision == "fp32"
    resnet = member.training_params(load_params(member.Params, tmp_path / "params.yaml"), "resnet")
    assert resnet.train.precision == "bf16"
    with pytest.raises(ParamsError, match=r"members\.nobody: no such member .*lite0, resnet"):
        member.training_params(load_params(member.Params, tmp_path / "params.yaml"), "nobody")


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({}, "members: Dictionary should have at least 1 item"),
        ({"a b": {"arch": "resnet10t", "seed": 0, "lr": 0.1, "epochs": 1}}, "members.a b.[key]"),
        ({"a": {"arch": "resnet10t", "seed": 0, "lr": 0.1, "epochs": 1, "depth": 3}},
         "members.a.depth: unknown key"),
        ({"a": {"arch": "resnet10t", "seed": 0, "lr": 0.1, "epochs": 1, "freeze_epochs": 2}},
         "a member's freeze_epochs must not exceed its epochs"),
        ({"a": {"arch": "resnet10t", "seed": 0, "epochs": 1}}, "members.a.lr: missing key"),
    ],
)  # fmt: skip
def test_bad_members_stop_the_validate_stage_naming_the_key(
    tmp_path: Path, members: dict, message: str
):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_whole({"members": members})))
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_params(WholeFile, tmp_path / "params.yaml")


def test_a_member_s_weights_file_must_be_pinned_before_any_work(project: Path):
    weights = project / "weights.safetensors"
    weights.write_bytes(b"not read")
    set_params(project, {"members": {"lite0": {"pretrained": str(weights)}}})
    with pytest.raises(ParamsError, match=r"members\.lite0\.pretrained_sha256: pin the weights"):
        member.main(stage_argv(project, "member@lite0"))
    assert not (project / "data/processed").exists()  # it stopped before asking for data


def _scores(tmp_path: Path, logits: dict[str, np.ndarray]) -> tuple[Path, pd.DataFrame]:
    """An index.csv (shuffled, as preprocess may write it) and each member's logits table."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 40), ("val", 30), ("test", 30)):
        for row in range(n):
            label = "PNEUMONIA" if row % 3 else "NORMAL"
            rows.append({"split": split, "row": row, "path": f"{split}/{label}/{row}.jpeg",
                         "label": label, "patient_id": f"{split}{row // 2}"})  # fmt: skip
    index = pd.DataFrame(rows)
    (tmp_path / "processed").mkdir()
    index.sample(frac=1, random_state=1).to_csv(tmp_path / "processed/index.csv", index=False)
    (tmp_path / "members").mkdir()
    positive = (index["label"] == "PNEUMONIA").to_numpy()
    for name, scale in logits.items():
        z = scale * np.where(positive, 1.0, -1.0) + rng.normal(0, 1.5, len(index))
        index.assign(logit=z)[["split", "row", "path", "logit"]].to_csv(
            tmp_path / f"members/{name}.csv", index=False
        )
    return tmp_path, index


def _run_ensemble(folder: Path, teacher: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    raw = _whole()
    raw["members"] = {
        name: {"arch": "resnet10t", "seed": 0, "lr": 0.1, "epochs": 1} for name in ("a", "b")
    }
    raw["distill"]["teacher"] = teacher
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    ensemble.main(["members", "processed/index.csv", "teacher.csv", "ensemble.json", "plots"])
    mlflow.set_tracking_uri(None)
    return json.loads((folder / "ensemble.json").read_text())


def test_the_ensemble_is_the_mean_of_calibrated_members_and_teaches_in_training_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder, index = _scores(tmp_path, {"a": 3.0, "b": 1.0})  # a separates better than b
    report = _run_ensemble(folder, "ensemble", monkeypatch)
    assert set(report) >= {"a", "b", "ensemble", "teacher", "best_by_val_log_loss"}
    assert report["a"]["val"]["roc_auc"] > report["b"]["val"]["roc_auc"]
    assert report["teacher"] == "ensemble"
    assert {"accuracy", "roc_auc_ci_low"} <= set(report["ensemble"]["test"])
    assert "threshold_picked_on_test" in report["ensemble"]["test_notebook_protocol"]
    assert (folder / "plots/roc.png").stat().st_size > 0

    teacher = pd.read_csv(folder / "teacher.csv")
    train = index[index["split"] == "train"].sort_values("row")
    assert teacher["path"].tolist() == train["path"].tolist()
    # logit of the mean of the members' probabilities, each at its validation temperature
    probs = []
    for name in ("a", "b"):
        z = pd.read_csv(folder / f"members/{name}.csv").query("split == 'train'")["logit"]
        probs.append(1 / (1 + np.exp(-z.to_numpy() / report[name]["temperature"])))
    mean = np.mean(probs, axis=0)
    np.testing.assert_allclose(teacher["logit"], np.log(mean / (1 - mean)), atol=1e-4)


def test_the_best_teacher_is_the_lowest_validation_log_loss_and_none_writes_no_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder, _ = _scores(tmp_path, {"a": 2.0, "b": 0.2})  # b is noise: it drags the mean down
    report = _run_ensemble(folder, "best", monkeypatch)
    losses = {name: report[name]["val"]["log_loss"] for name in ("a", "b", "ensemble")}
    assert report["best_by_val_log_loss"] == report["teacher"] == min(losses, key=losses.get)
    assert report["teacher"] == "a"
    z = pd.read_csv(folder / "members/a.csv").query("split == 'train'")["logit"].to_numpy()
    taught = pd.read_csv(folder / "teacher.csv")["logit"].to_numpy()
    p = np.clip(1 / (1 + np.exp(-z / report["a"]["temperature"])), 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(taught, np.log(p / (1 - p)), atol=1e-4)

    _run_ensemble(folder, "none", monkeypatch)
    assert (folder / "teacher.csv").read_text().strip() == "path,logit"


def test_a_member_table_of_other_images_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder, _ = _scores(tmp_path, {"a": 3.0, "b": 1.0})
    table = pd.read_csv(folder / "members/b.csv")
    table.iloc[::-1].to_csv(folder / "members/b.csv", index=False)
    with pytest.raises(StageError, match=r"members/b\.csv scores other images"):
        _run_ensemble(folder, "ensemble", monkeypatch)


def test_train_reads_the_teacher_with_its_settings_and_refuses_other_images(
    prepared_project: Path, tmp_path: Path
):
    split = load_split("train", prepared_project / "data/processed")
    table = pd.read_csv(prepared_project / "data/teacher.csv")
    assert table["path"].tolist() == split.index["path"].tolist()
    distill = DistillParams(teacher="ensemble", temperature=3.0, weight=0.25)
    taught = read_teacher(prepared_project / "data/teacher.csv", distill, split)
    assert taught.logits.shape == (len(split.labels),)
    assert taught.sha256 == sha256_of(prepared_project / "data/teacher.csv")
    loss = taught.loss(LABEL_LOSS)  # the declared temperature and weight reach the loss
    assert isinstance(loss, DistillationLoss) and loss.hard is LABEL_LOSS
    assert (loss.temperature, loss.weight) == (3.0, 0.25)
    table.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(StageError, match=r"short\.csv holds .* do not follow the training split"):
        read_teacher(tmp_path / "short.csv", distill, split)
    none = DistillParams(teacher="none", temperature=2.0, weight=0.5)
    assert read_teacher(tmp_path / "short.csv", none, split) is None


def test_a_checkpoint_resumes_only_with_the_teacher_it_learned_from(prepared_project: Path):
    params = load_params(TrainingParams, prepared_project / "params.yaml")
    processed = prepared_project / "data/processed"
    assert fingerprint(params, processed, "w", "t1") != fingerprint(params, processed, "w", "t2")
    assert fingerprint(params, processed, "w", "") == fingerprint(params, processed, "w")


def test_members_train_log_and_score_every_image(prepared_project: Path):
    processed = prepared_project / "data/processed"
    index = pd.read_csv(processed / "index.csv")
    client = mlflow.MlflowClient(f"sqlite:///{prepared_project.parent / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_stage = {r.data.tags.get("dvc.stage"): r for r in runs}
    for stage in MEMBER_STAGES:
        name = stage.split("@")[1]
        scores = pd.read_csv(prepared_project / f"data/members/{name}.csv")
        assert len(scores) == len(index) and scores["logit"].notna().all()
        assert sorted(scores["path"]) == sorted(index["path"])
        summary = json.loads((prepared_project / f"metrics/members/{name}.json").read_text())
        assert summary["epochs_run"] >= 1
        assert (prepared_project / f"models/members/{name}.pt").stat().st_size > 0
        assert stage in by_stage
    lite0 = by_stage["member@lite0"]
    assert lite0.data.params["model.arch"] == "tf_efficientnet_lite0"
    assert lite0.data.tags["pretrained.source"] == "efficientnet-lite0"
    assert len(lite0.data.tags["pretrained.source_sha256"]) == 64
    assert "ensemble" in by_stage
    report = json.loads((prepared_project / "metrics/ensemble.json").read_text())
    assert report["teacher"] == report["best_by_val_log_loss"]  # the tiny params' `best`


def test_the_deployed_network_is_distilled_from_the_teacher(trained: Path):
    client = mlflow.MlflowClient(f"sqlite:///{trained.parent / 'mlflow.db'}")
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`dvc.stage` = 'train'"
    )
    assert run.data.tags["teacher.sha256"] == sha256_of(trained / "data/teacher.csv")
    assert run.data.params["distill.teacher"] == "best"
    assert float(run.data.params["distill.weight"]) == 0.5
