import re
from pathlib import Path

import pytest
import yaml

from cxr.params import ParamsError, as_flat_dict, load_params
from stages.validate import Params
from tests.conftest import REPO, set_params


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def test_repository_params_load_with_their_types():
    params = load_params(Params, REPO / "params.yaml")
    assert isinstance(params.lr, float)
    assert isinstance(params.epochs, int)
    assert isinstance(params.train.augment.hflip, bool)
    assert as_flat_dict(params)["train.augment.rotation_deg"] == params.train.augment.rotation_deg


@pytest.mark.parametrize("spelling", ["1e-5", "1e-05", "1.0e-5", "0.00001"])
def test_exponent_spellings_reach_the_code_as_floats(params_file: Path, spelling: str):
    # `dvc exp run -S lr=1e-5` writes YAML 1.2 floats that PyYAML reads as strings.
    text = (params_file / "params.yaml").read_text()
    (params_file / "params.yaml").write_text(text.replace("lr: 0.001", f"lr: {spelling}", 1))
    assert yaml.safe_load((params_file / "params.yaml").read_text())["lr"] in (spelling, 1e-5)
    lr = load_params(Params, params_file / "params.yaml").lr
    assert isinstance(lr, float)
    assert lr == pytest.approx(1e-5)


def test_integral_float_is_accepted_for_int_and_bool_strings(params_file: Path):
    set_params(params_file, {"epochs": 3.0, "runtime": {"resume": "false"}})
    params = load_params(Params, params_file / "params.yaml")
    assert params.epochs == 3
    assert isinstance(params.epochs, int)
    assert params.runtime.resume is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 2.5}, "epochs: Input should be a valid integer, got a number with a"),
        ({"lr": "fast"}, "lr: Input should be a valid number, unable to parse string"),
        ({"lr": 0}, "lr: Input should be greater than 0, got 0"),
        ({"split": {"val_fraction": 0.9}}, "split.val_fraction: Input should be less than or"),
        ({"split": {"fold": 7}}, "split.fold must be below the 7 folds that split.val_fraction"),
        ({"train": {"ema_decay": 1}}, "train.ema_decay: Input should be less than 1, got 1"),
        ({"train": {"augment": {"hflip": "maybe"}}}, "train.augment.hflip: Input should be a"),
        ({"data": {"source": "s3"}}, "data.source: Input should be 'demo', 'kaggle', 'url' or"),
        ({"runtime": {"device": "tpu"}}, "runtime.device: Input should be 'auto', 'cuda',"),
        ({"train": {"freeze_epochs": 50}}, "train.freeze_epochs must not exceed epochs"),
        ({"data": {"source": "url"}}, "data.source=url needs data.url and data.url_sha256"),
    ],
)
def test_invalid_values_name_the_key(params_file: Path, overrides: dict, message: str):
    set_params(params_file, overrides)
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(Params, params_file / "params.yaml")


def test_unknown_and_missing_keys_are_named(params_file: Path):
    path = params_file / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["train"]["learning_rate"] = 0.1
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"params.yaml: train.learning_rate: unknown key$"):
        load_params(Params, path)
    del raw["train"]["learning_rate"], raw["model"]["arch"], raw["runtime"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"runtime: missing key; model.arch: missing key$"):
        load_params(Params, path)


def test_each_stage_checks_its_own_sections_and_validate_checks_the_whole_file(
    params_file: Path, monkeypatch: pytest.MonkeyPatch
):
    """A stage's schema holds only what it reads (so its code deps hold only those schemas);
    the validate stage, first in the pipeline, still stops a bad value for a later stage and a
    misspelt section before any stage works."""
    from stages import gradcam, train, validate

    monkeypatch.chdir(params_file)
    checked = params_file / "data" / "params.ok"
    validate.main([str(checked)])
    assert checked.read_text() == validate.STAMP

    checked.unlink()
    set_params(params_file, {"gradcam": {"method": "gradcam+"}})
    assert load_params(train.Params).lr == 0.001  # train does not read gradcam
    with pytest.raises(ParamsError, match=r"gradcam.method: Input should be 'gradcam'"):
        load_params(gradcam.Params)
    with pytest.raises(ParamsError, match=r"gradcam.method: Input should be 'gradcam'"):
        validate.main([str(checked)])
    assert not checked.exists()

    raw = yaml.safe_load((params_file / "params.yaml").read_text())
    raw["gradcam"]["method"] = "gradcam"
    raw["trian"] = {"lr": 0.1}
    (params_file / "params.yaml").write_text(yaml.safe_dump(raw))
    assert load_params(gradcam.Params).gradcam.method == "gradcam"
    with pytest.raises(ParamsError, match=r"params.yaml: trian: unknown key$"):
        validate.main([str(checked)])


# The documentation's `dvc exp run -S key=value` commands, checked against params.yaml as typed.
DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OVERRIDE = re.compile(r"-S\s+'?(\+?)([\w.]+)=([^\s'`]*)")


def documented_commands() -> list[tuple[str, str]]:
    """Every `dvc exp run` in the docs' fenced blocks, its continuation lines joined."""
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), re.S):
            joined = block.replace("\\\n", " ").splitlines()
            commands += [(doc.name, line) for line in joined if "dvc exp run" in line]
    return commands


def test_every_documented_override_names_a_key_params_yaml_has():
    # DVC's -S (Hydra's override grammar) refuses a key that params.yaml lacks unless it is
    # spelled +key, even one the schema defaults: such a documented command fails as typed.
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    wrong = []
    for doc in DOCS:
        for plus, key, _ in OVERRIDE.findall(doc.read_text()):
            node: object = params
            for part in key.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            if (node is KeyError) != bool(plus):
                wrong.append(f"{doc.relative_to(REPO)}: -S {plus}{key}")
    assert not wrong, f"overrides that `dvc exp run` would refuse: {wrong}"


def test_documented_commands_are_found():
    commands = documented_commands()
    assert any(line.startswith("dvc exp run -S lr=1e-5 ") for _, line in commands)
    assert any(doc == "README.md" and "--name real-distilled" in line for doc, line in commands)
    assert len(commands) >= 5


@pytest.mark.parametrize(("doc", "command"), documented_commands())
def test_every_documented_command_gives_valid_params(params_file: Path, doc: str, command: str):
    overrides: dict = {}
    for _, key, value in OVERRIDE.findall(command):
        *parents, leaf = key.split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)  # typed as -S types it; '""' is the empty string
    set_params(params_file, overrides)
    load_params(Params, params_file / "params.yaml")  # raises ParamsError naming the key
