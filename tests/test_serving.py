"""The registered MLflow model: registry entry, in-process pyfunc, and `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from cxr.model import Classifier
from cxr.predict import main as predict
from tests.conftest import REPO, run_stage, sh, tool_env

NAME = "chest-xray-pneumonia"  # params.yaml mlflow.registered_model
# README, Deploy: the call a user types, with its port and file filled in.
CURL = (
    """printf '{"dataframe_split": {"columns": ["image"], "data": [["%s"]]}}' """
    """"$(base64 -w0 FILE)" | curl -s URL/invocations -H 'Content-Type: application/json' -d @-"""
)


@pytest.fixture(scope="module")
def evaluated(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The trained project evaluated once more into a store of its own: version 1, @candidate."""
    tmp = tmp_path_factory.mktemp("served")
    folder = tmp / "project"
    shutil.copytree(trained, folder)
    env = tool_env(tmp)
    out = run_stage(folder, "evaluate", env=env)
    assert f"registered models:/{NAME}@candidate (version 1)" in out
    return folder, env


@pytest.fixture(scope="module")
def xrays(evaluated: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real files of each kind a hospital may send: a JPEG, a PNG, an RGB JPEG, a corrupt one."""
    folder, _ = evaluated
    out = tmp_path_factory.mktemp("xrays")
    normal = sorted((folder / "data/raw/test/NORMAL").iterdir())[0]
    sick = sorted((folder / "data/raw/test/PNEUMONIA").iterdir())[0]
    shutil.copy(normal, out / "normal.jpeg")
    Image.open(sick).save(out / "sick.png")
    Image.open(sick).convert("RGB").rotate(3).save(out / "sick_rgb.jpeg", quality=90)
    (out / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return [out / n for n in ("normal.jpeg", "sick.png", "sick_rgb.jpeg", "corrupt.jpeg")]


def cli_answers(model: Path, files: list[Path], capsys: pytest.CaptureFixture) -> dict:
    """pneumonia-predict's (probability, label) per readable file, as it prints them."""
    predict([*map(str, files), "--model", str(model), "--no-cam"])
    answers = {}
    for line in capsys.readouterr().out.splitlines():
        if "p(pneumonia)=" in line:
            path, probability, label = line.split("  ")
            answers[Path(path).name] = (float(probability.split("=")[1]), label)
    return answers


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
    trained_by = Classifier.load(folder / "models/model.pt").card.mlflow_run_id
    assert version.tags["training_run_id"] == trained_by != ""
    # Weights and threshold are artifacts; the model is code, not a pickled object.
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate"))
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == ["model.pt", "threshold.json"]
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
    assert sorted(expected) == ["normal.jpeg", "sick.png", "sick_rgb.jpeg"]
    for path, row in zip(xrays[:3], out.itertuples(), strict=False):
        assert (round(row.probability, 4), row.label) == expected[path.name]
        assert pd.isna(row.error)
    corrupt = out.iloc[3]
    assert corrupt.probability is None and corrupt.label is None
    assert corrupt.error.startswith("image 3: ")  # the row names the image; PIL says what broke
    threshold = json.loads((folder / "models/threshold.json").read_text())["threshold"]
    assert (out["threshold"] == threshold).all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    process = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"mlflow models serve did not start:\n{process.stdout.read()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_served_model_answers_like_the_cli(
    server: str, evaluated: tuple[Path, dict], xrays: list[Path], capsys: pytest.CaptureFixture
):
    folder, _ = evaluated
    status, answer = post(f"{server}/invocations", xrays)
    assert status == 200
    rows = answer["predictions"]
    expected = cli_answers(folder / "models/model.pt", xrays, capsys)
    for path, row in zip(xrays[:3], rows, strict=False):
        assert (round(row["probability"], 4), row["label"]) == expected[path.name]
    assert rows[3]["error"].startswith("image 3: ")
    assert rows[3]["label"] is None and rows[3]["probability"] is None
    command = CURL.replace("FILE", str(xrays[1])).replace("URL", server)
    (row,) = json.loads(subprocess.run(["bash", "-c", command], capture_output=True).stdout)[
        "predictions"
    ]
    assert (round(row["probability"], 4), row["label"]) == expected["sick.png"]


def test_promotion_points_champion_at_the_candidate(evaluated: tuple[Path, dict]):
    folder, env = evaluated
    out = sh(folder, sys.executable, str(REPO / "tools/promote.py"), env=env)
    assert f"models:/{NAME}@champion -> version 1" in out
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1


def test_served_model_takes_a_bounded_load_without_error(server: str, xrays: list[Path]):
    """50 requests, 4 at a time, over loopback: every one answered, every answer the same."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: post(f"{server}/invocations", xrays[:1]), range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert len({json.dumps(answer) for _, answer in results}) == 1
