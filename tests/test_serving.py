"""The registered MLflow model: registry entry, in-process pyfunc, and `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxr.classifier import Classifier
from cxr.predict import main as predict
from tests.conftest import REPO, free_port, run_stage_in_process, serve, sh, tool_env

NAME = "chest-xray-pneumonia"  # params.yaml mlflow.registered_model
# docs/deploy.md: the call a user types, with its port and file filled in.
CURL = (
    """printf '{"dataframe_split": {"columns": ["image"], "data": [["%s"]]}}' """
    """"$(base64 -w0 FILE)" | curl -s URL/invocations -H 'Content-Type: application/json' -d @-"""
)


@pytest.fixture(scope="module")
def evaluated(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The trained project as a clean git checkout, evaluated once more into a store of its
    own: version 1, @candidate."""
    tmp = tmp_path_factory.mktemp("served")
    folder = tmp / "project"
    shutil.copytree(trained, folder)
    env = tool_env(tmp)
    commit_as_checkout(folder, env)
    out = run_stage_in_process(folder, "evaluate", env["MLFLOW_TRACKING_URI"])
    assert f"registered models:/{NAME}@candidate (version 1)" in out
    return folder, env


STAGES_RUN = (
    "validate",
    "download",
    "split",
    "preprocess",
    "train",
    "guard",
    "evaluate",
    "gradcam",
)


def commit_as_checkout(folder: Path, env: dict[str, str]) -> None:
    """Make `folder` a git and DVC checkout whose last commit holds an earlier run's outputs,
    as a checkout is when its code or params were committed before `dvc repro` ran.

    dvc.lock records the stages that ran (and the data hashes a registered version carries);
    evaluate then rewrites its tracked outputs, which differ from the committed ones, as its
    own outputs do in every run that changed anything.
    """
    sh(folder, "git", "init", "-q", "-b", "main", env=env)
    sh(folder, sys.executable, "-m", "dvc", "init", "-q", env=env)
    sh(folder, sys.executable, "-m", "dvc", "commit", "-f", "-q", *STAGES_RUN, env=env)
    for earlier in ("metrics/evaluate.json", "models/threshold.json"):
        (folder / earlier).write_text('{"threshold": 0.5}\n')
    sh(folder, "git", "add", "-A", env=env)
    sh(folder, "git", "commit", "-qm", "an earlier run's outputs", env=env)


@pytest.fixture(scope="module")
def xrays(evaluated: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Files of each kind a hospital may send: a JPEG, a PNG, an RGB JPEG, a corrupt one, and
    one that is not an X-ray at all (noise)."""
    folder, _ = evaluated
    out = tmp_path_factory.mktemp("xrays")
    normal = sorted((folder / "data/raw/test/NORMAL").iterdir())[0]
    sick = sorted((folder / "data/raw/test/PNEUMONIA").iterdir())[0]
    shutil.copy(normal, out / "normal.jpeg")
    Image.open(sick).save(out / "sick.png")
    Image.open(sick).convert("RGB").rotate(3).save(out / "sick_rgb.jpeg", quality=90)
    (out / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    noise = np.random.default_rng(0).integers(0, 256, (200, 240), dtype=np.uint8)
    Image.fromarray(noise).save(out / "noise.png")
    names = ("normal.jpeg", "sick.png", "sick_rgb.jpeg", "corrupt.jpeg", "noise.png")
    return [out / n for n in names]


def cli_answers(model: Path, files: list[Path], capsys: pytest.CaptureFixture) -> dict:
    """pneumonia-predict's (probability, label) per readable file, as it prints them; (None,
    None) for a file its input guard flags."""
    predict([*map(str, files), "--model", str(model), "--no-cam"])
    answers = {}
    for line in capsys.readouterr().out.splitlines():
        if "p(pneumonia)=" in line:
            path, probability, label, *_ = line.split("  ")
            answers[Path(path).name] = (float(probability.split("=")[1]), label)
        elif "  OUT OF DISTRIBUTION: " in line:
            answers[Path(line.split("  ")[0]).name] = (None, None)
    return answers


def as_printed(probability: float, label: str | None) -> tuple:
    """A served row as the CLI prints it: no probability where the guard withheld the label."""
    return (None, None) if label is None else (round(probability, 4), label)


def test_each_evaluation_registers_a_candidate_with_its_card(evaluated: tuple[Path, dict]):
    folder, env = evaluated
    uri = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias(NAME, "candidate")
    assert int(version.version) == 1
    report = json.loads((folder / "metrics/evaluate.json").read_text())
    test = report["test"]
    assert f"roc_auc {test['roc_auc']:.3f} [{test['roc_auc_ci_low']:.3f}," in version.description
    assert f"threshold {report['threshold']:.4f} chosen on validation" in version.description
    assert f"the input guard refuses {test['refused']:.1%} of them" in version.description
    trained_by = Classifier.load(folder / "models/model.pt").card.mlflow_run_id
    assert version.tags["training_run_id"] == trained_by != ""
    # Lineage: the commit and data it came from. Evaluate rewrote its own tracked outputs,
    # which leaves the checkout as clean as the code and params that ran.
    assert version.tags["git.commit"] == sh(folder, "git", "rev-parse", "HEAD", env=env).strip()
    assert version.tags["git.dirty"] == "False"
    assert "metrics/evaluate.json" in sh(folder, "git", "status", "--porcelain", env=env)
    lock = yaml.safe_load((folder / "dvc.lock").read_text())["stages"]
    data = {
        f"dvc.md5.{out['path']}": out["md5"]
        for stage in lock.values() for out in stage.get("outs", [])
        if out["path"].startswith("data/")
    }  # fmt: skip
    assert "dvc.md5.data/processed" in data
    assert {key: version.tags.get(key) for key in data} == data
    # Weights and threshold are artifacts; the model is code, not a pickled object.
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate"))
    artifacts = sorted(p.name for p in (local / "artifacts").iterdir())
    assert artifacts == ["guard.pt", "model.pt", "threshold.json"]
    assert not list(local.rglob("*.pkl"))
    model = mlflow.models.Model.load(local)
    assert model.signature.inputs.to_dict() == [
        {"type": "binary", "name": "image", "required": True}
    ]
    assert model.saved_input_example_info is not None


def test_pyfunc_answers_like_the_cli_and_reports_a_corrupt_image(
    evaluated: tuple[Path, dict], xrays: list[Path], capsys: pytest.CaptureFixture
):
    folder, env = evaluated
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in xrays]}))
    expected = cli_answers(folder / "models/model.pt", xrays, capsys)
    assert sorted(expected) == ["noise.png", "normal.jpeg", "sick.png", "sick_rgb.jpeg"]
    for path, row in zip(xrays[:3], out.itertuples(), strict=False):
        assert as_printed(row.probability, row.label) == expected[path.name]
        assert pd.isna(row.error) and row.in_distribution is (row.label is not None)
    corrupt = out.iloc[3]
    assert corrupt.probability is None and corrupt.label is None
    assert corrupt.error.startswith("image 3: ")  # the row names the image; PIL says what broke
    threshold = json.loads((folder / "models/threshold.json").read_text())["threshold"]
    assert (out["threshold"] == threshold).all()
    noise = out.iloc[4]  # a diagnosis withheld, the probability kept for audit
    assert expected["noise.png"] == (None, None)
    assert noise.in_distribution is False and noise.label is None and noise.probability >= 0
    assert noise.warning.startswith("not like the chest X-rays this model was trained on")
    assert noise.ood_score > noise.ood_threshold == out.iloc[0].ood_threshold


def post(url: str, files: list[Path]) -> tuple[int, dict]:
    rows = [[base64.b64encode(p.read_bytes()).decode("ascii")] for p in files]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(evaluated: tuple[Path, dict]) -> str:
    """`mlflow models serve` of the candidate on a free loopback port, stopped afterwards."""
    folder, env = evaluated
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@candidate",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    process = serve(command, url, "/ping", cwd=folder, env=env)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow  # `mlflow models serve` in its own environment
def test_served_model_answers_like_the_cli(
    server: str, evaluated: tuple[Path, dict], xrays: list[Path], capsys: pytest.CaptureFixture
):
    folder, _ = evaluated
    status, answer = post(f"{server}/invocations", xrays)
    assert status == 200
    rows = answer["predictions"]
    expected = cli_answers(folder / "models/model.pt", xrays, capsys)
    for path, row in zip(xrays[:3], rows, strict=False):
        assert as_printed(row["probability"], row["label"]) == expected[path.name]
    assert rows[3]["error"].startswith("image 3: ")
    assert rows[3]["label"] is None and rows[3]["probability"] is None
    assert rows[4]["in_distribution"] is False and rows[4]["label"] is None
    command = CURL.replace("FILE", str(xrays[1])).replace("URL", server)
    answer = subprocess.run(["bash", "-c", command], capture_output=True, timeout=120).stdout
    (row,) = json.loads(answer)["predictions"]
    assert as_printed(row["probability"], row["label"]) == expected["sick.png"]


def test_promotion_points_champion_at_the_candidate(evaluated: tuple[Path, dict]):
    folder, env = evaluated
    out = sh(folder, sys.executable, str(REPO / "tools/promote.py"), env=env)
    assert f"models:/{NAME}@champion -> version 1" in out
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1


@pytest.mark.slow  # `mlflow models serve` in its own environment
def test_served_model_takes_a_bounded_load_without_error(server: str, xrays: list[Path]):
    """50 requests, 4 at a time, over loopback: every one answered, every answer the same."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: post(f"{server}/invocations", xrays[:1]), range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert len({json.dumps(answer) for _, answer in results}) == 1
