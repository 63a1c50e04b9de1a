"""tools/promote.py against a registry holding several evaluated versions, as `dvc queue start`
leaves one: it promotes on its own only when one version awaits review."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO

NAME = "chest-xray-pneumonia"  # params.yaml mlflow.registered_model


@pytest.fixture
def registry(tmp_path: Path) -> mlflow.MlflowClient:
    """An empty SQLite registry with the project's registered model, no version yet."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(NAME)
    return client


def register(client: mlflow.MlflowClient, experiment: str, auc: float) -> str:
    """A version as evaluate registers it: card, experiment tag, `candidate` alias."""
    card = (
        f"resnet18, 224 px; threshold 0.5000 chosen on validation ({experiment}).\n"
        f"Official test set, 624 images from 400 patients: roc_auc {auc:.3f}\n"
        "Input: encoded JPEG/PNG files"
    )
    version = client.create_model_version(
        NAME, source="/nowhere/model", tags={"dvc.exp_name": experiment}, description=card
    )
    client.set_registered_model_alias(NAME, "candidate", version.version)
    return version.version


def promote(client: mlflow.MlflowClient, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "MLFLOW_TRACKING_URI": client.tracking_uri}
    return subprocess.run(
        [sys.executable, str(REPO / "tools/promote.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def champion(client: mlflow.MlflowClient) -> str | None:
    aliases = client.get_registered_model(NAME).aliases
    return str(aliases["champion"]) if "champion" in aliases else None


@pytest.mark.slow  # evaluate, registry and tools/promote.py end to end
def test_several_new_versions_are_listed_and_none_is_promoted_without_a_choice(
    registry: mlflow.MlflowClient,
):
    for experiment, auc in (("lr-0.002", 0.91), ("lr-0.003", 0.87)):
        register(registry, experiment, auc)

    result = promote(registry)

    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stderr
    assert f"2 versions of {NAME} registered and no champion yet" in message
    assert "version 1 (lr-0.002):" in message and "version 2 (lr-0.003):" in message
    assert "roc_auc 0.910" in message and "roc_auc 0.870" in message
    assert "Input: encoded" not in message  # the card's first two lines only
    assert "--version N" in message
    assert champion(registry) is None

    result = promote(registry, "--version", "1")
    assert result.returncode == 0, result.stderr
    assert f"models:/{NAME}@champion -> version 1" in result.stdout
    assert champion(registry) == "1"


@pytest.mark.slow  # evaluate, registry and tools/promote.py end to end
def test_the_one_version_since_the_champion_is_promoted_and_more_are_listed(
    registry: mlflow.MlflowClient,
):
    register(registry, "baseline", 0.90)
    assert promote(registry).returncode == 0  # one version, no champion: nothing to choose
    assert champion(registry) == "1"
    register(registry, "flip-tta", 0.92)

    result = promote(registry)

    assert result.returncode == 0, result.stderr
    assert f"models:/{NAME}@champion -> version 2" in result.stdout
    assert champion(registry) == "2"

    register(registry, "seed-1", 0.93)
    register(registry, "seed-2", 0.88)
    result = promote(registry)
    assert result.returncode == 1
    assert "registered since the champion (version 2)" in result.stderr
    assert "version 3 (seed-1)" in result.stderr and "version 4 (seed-2)" in result.stderr
    assert "version 2 (" not in result.stderr and "version 1 (" not in result.stderr
    assert champion(registry) == "2"

    assert promote(registry, "--version", "4").returncode == 0
    result = promote(registry)
    assert result.returncode == 0
    assert "is version 4, the latest: nothing to do" in result.stdout
    assert champion(registry) == "4"
