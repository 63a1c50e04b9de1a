"""dvc.yaml states each stage's contract; these tests prove the code keeps to it.

A stage that reads a param or imports a module that dvc.yaml does not declare is a stage DVC
will not re-run when that input changes: the cache then hands back a stale result. The params a
stage reads are found mechanically, by running the stage on tiny data with a params object
that records every setting looked up; the modules, by following `cxr` imports from its script.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from cxr import params as params_module
from cxr.params import RUN_ONLY_SECTIONS
from tests.conftest import MEMBER_STAGES, REPO, pipeline_stages, stage_argv, stage_module
from tools.dep_table import module_stages

# In the order they run; the tiny projects keep the demo's member names.
STAGES = (
    "validate",
    "download",
    "split",
    "preprocess",
    *MEMBER_STAGES,
    "ensemble",
    "pretrained",
    "train",
    "guard",
    "evaluate",
    "gradcam",
    "export",
)


PACKAGES = ("cxr", "stages")  # a stage may run another stage's work function (member: train's)


def dvc_stages() -> dict[str, dict]:
    return pipeline_stages(REPO)


def test_every_stage_of_the_pipeline_is_checked():
    assert set(STAGES) == set(dvc_stages())


def declared_paths(stage: dict, kind: str) -> set[str]:
    entries = stage.get(kind, [])
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def project_imports(path: Path) -> set[str]:
    """Files of the cxr modules and stage scripts a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:
            found |= {f"{node.module}/{alias.name}.py" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            found.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.Import):
            found |= {
                a.name.replace(".", "/") + ".py"
                for a in node.names
                if a.name.split(".")[0] in PACKAGES and "." in a.name
            }
    return found


def imported_closure(script: str) -> set[str]:
    seen: set[str] = set()
    todo = [REPO / script]
    while todo:
        for module in project_imports(todo.pop()) - seen:
            seen.add(module)
            todo.append(REPO / module)
    return seen


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_the_script_and_every_cxr_module_it_imports(name: str):
    script = stage_module(name).replace(".", "/") + ".py"
    code_deps = {p for p in declared_paths(dvc_stages()[name], "deps") if p.endswith(".py")}
    assert code_deps == {script} | imported_closure(script)


@pytest.mark.parametrize("name", STAGES)
def test_paths_on_the_command_line_are_exactly_the_declared_data(name: str):
    stage = dvc_stages()[name]
    data_deps = {p for p in declared_paths(stage, "deps") if not p.endswith(".py")}
    outputs = set().union(*(declared_paths(stage, k) for k in ("outs", "metrics", "plots")))
    assert stage["cmd"].split()[:3] == ["python", "-m", stage_module(name)]
    argv = stage_argv(REPO, name)
    if "@" in name:  # a foreach stage's first argument is its item's name (member@lite0: lite0)
        assert argv.pop(0) == name.split("@")[1]
    assert set(argv) == data_deps | outputs


class Recorder:
    """Stands in for a params model and notes the dotted key of every setting read."""

    def __init__(self, node: BaseModel, reads: set[str], prefix: str = "") -> None:
        self._node, self._reads, self._prefix = node, reads, prefix

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._node, name)
        if name not in type(self._node).model_fields:
            return value  # a method such as model_dump: logging params reads no setting
        key = self._prefix + name
        if isinstance(value, BaseModel):
            return Recorder(value, self._reads, key + ".")
        if isinstance(value, dict):
            return RecordedEntries(value, self._reads, key)
        self._reads.add(key)
        return value


class RecordedEntries(dict):
    """A section of named entries (`members`): listing the names reads the section, looking
    one up reads only that entry."""

    def __init__(self, entries: dict, reads: set[str], key: str) -> None:
        super().__init__(entries)
        self._reads, self._key = reads, key

    def __iter__(self):
        self._reads.add(self._key)
        return super().__iter__()

    def __getitem__(self, name: str) -> Recorder:
        return Recorder(super().__getitem__(name), self._reads, f"{self._key}.{name}.")


@pytest.fixture(scope="module")
def reads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The params.yaml keys each stage reads while it runs, end to end, on tiny demo data."""
    from tests.conftest import copy_project

    folder = copy_project(tmp_path_factory.mktemp("contracts") / "project")
    monkey = pytest.MonkeyPatch()
    monkey.chdir(folder)
    monkey.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder.parent / 'mlflow.db'}")
    found: dict[str, set[str]] = {}
    try:
        for name in STAGES:
            module = importlib.import_module(stage_module(name))
            found[name] = set()
            reads = found[name]

            def recorded(schema, *_, reads=reads):
                return Recorder(params_module.load_params(schema, folder / "params.yaml"), reads)

            monkey.setattr(module, "load_params", recorded)
            module.main(stage_argv(folder, name))
    finally:
        monkey.undo()
    return found


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def declared_params(name: str) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in dvc_stages()[name]["params"]]


def test_validate_declares_every_section_that_changes_a_result():
    """It validates the whole file, so any change to a result's settings re-runs the check."""
    top_level = yaml.safe_load((REPO / "params.yaml").read_text())
    assert declared_params("validate") == [k for k in top_level if k not in RUN_ONLY_SECTIONS]


@pytest.mark.parametrize("name", [s for s in STAGES if s != "validate"])
def test_declared_params_are_exactly_those_the_stage_reads(reads, name: str):
    declared = declared_params(name)
    result_keys = {k for k in reads[name] if k.split(".")[0] not in RUN_ONLY_SECTIONS}
    undeclared = {k for k in result_keys if not any(covers(d, k) for d in declared)}
    assert not undeclared, f"{name} reads {sorted(undeclared)} without declaring them"
    unread = [d for d in declared if not any(covers(d, k) for k in result_keys)]
    assert not unread, f"{name} declares {unread} but never reads them"
    assert not [d for d in declared if d.split(".")[0] in RUN_ONLY_SECTIONS]


def test_every_stage_reads_some_params_and_the_recorder_sees_nested_keys(reads):
    assert "train.ema_decay" in reads["train"]
    assert "train.augment.rotation_deg" in reads["train"]
    assert "runtime.device" in reads["train"]  # read, and rightly not declared
    assert "lr" not in reads["evaluate"]


# The stages each cxr module is a code dep of: the stages DVC re-runs after any edit to it,
# a docstring's included (reviewed like code: a new row or a longer one re-runs more). With
# the test above, a new import that pulls a module into a stage's closure fails here until the
# table says so. `validate` (stages/validate.py) holds every section's schema; it runs in
# seconds and its output never changes, so it re-runs nothing after it. `tracking` writes the
# MLflow record that is part of what a stage produces. `member` stands for every member@<name>
# (one definition in dvc.yaml); it trains with cxr/trainer.py as train does, so it shares
# train's row but for `pretrained` (it resolves its own weights) and `distill` (how train
# learns from the members must not retrain them). Not listed: modules no stage imports (the
# CLI, the page, the served model).
EVERY_STAGE = " ".join(dict.fromkeys(s.split("@")[0] for s in STAGES))
INTENDED_DEPS = {
    "cxr/atomic.py": EVERY_STAGE,
    "cxr/augment.py": "validate member train",
    "cxr/batches.py": "validate member train",
    "cxr/checkpoint.py": "member train",
    "cxr/classes.py": "validate download preprocess member ensemble pretrained train guard "
                      "evaluate gradcam export",
    "cxr/classifier.py": "validate guard evaluate gradcam export",
    "cxr/dataset.py": "validate download",
    "cxr/demo.py": "download guard",
    "cxr/device.py": "validate member train guard evaluate gradcam export",
    "cxr/distill.py": "validate ensemble train",
    "cxr/distributed.py": "validate member train",
    "cxr/evaluation.py": "validate ensemble evaluate",
    "cxr/explain.py": "validate gradcam",
    "cxr/figures.py": "guard gradcam",
    "cxr/guard.py": "validate guard evaluate gradcam export",
    "cxr/images.py": "validate download preprocess guard evaluate gradcam export",
    "cxr/members.py": "validate member ensemble",
    "cxr/metric_figures.py": "evaluate",
    "cxr/model.py": "validate member pretrained train guard evaluate gradcam export",
    "cxr/onnx_model.py": "validate export",
    "cxr/ood_set.py": "guard",
    "cxr/params.py": EVERY_STAGE,
    "cxr/preprocessing.py": "validate preprocess",
    "cxr/pretrained.py": "member pretrained",
    "cxr/processed.py": "validate preprocess member ensemble train guard evaluate gradcam export",
    "cxr/sampling.py": "guard gradcam",
    "cxr/schedule.py": "validate member train",
    "cxr/serving.py": "evaluate",
    "cxr/sources.py": "validate download",
    "cxr/splitting.py": "validate split",
    "cxr/stage.py": EVERY_STAGE,
    "cxr/tracking.py": "member ensemble train guard evaluate gradcam export",
    "cxr/trainer.py": "member train",
    "cxr/training.py": "validate member train",
}  # fmt: skip


def test_each_module_is_a_dep_of_the_intended_stages_only():
    table = {m: " ".join(stages) for m, stages in module_stages(REPO / "dvc.yaml").items()}
    assert table == INTENDED_DEPS
    # What issue 23 found: plots, a Grad-CAM option, JPEG decoding and manifest code made DVC
    # retrain the network.
    retrains = {m for m, stages in INTENDED_DEPS.items() if "train" in stages.split()}
    assert not retrains & {"cxr/figures.py", "cxr/explain.py", "cxr/images.py", "cxr/dataset.py"}
    # The ensemble's scoring code retrains no member and no network.
    trains = {m for m, stages in INTENDED_DEPS.items() if {"member", "train"} & set(stages.split())}
    assert "cxr/evaluation.py" not in trains
    # Nor does an edit to how the train stage distills, or to its script: members train with
    # cxr/trainer.py, not through stages/train.py.
    assert "member" not in INTENDED_DEPS["cxr/distill.py"].split()
    assert "stages/train.py" not in pipeline_stages(REPO)["member@lite0"]["deps"]
