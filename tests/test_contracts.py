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
from tests.conftest import REPO, stage_argv

STAGES = (
    "download",
    "split",
    "preprocess",
    "pretrained",
    "train",
    "guard",
    "evaluate",
    "gradcam",
    "export",
)


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared_paths(stage: dict, kind: str) -> set[str]:
    entries = stage.get(kind, [])
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def cxr_imports(path: Path) -> set[str]:
    """Files of the cxr modules a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "cxr":
            found |= {f"cxr/{alias.name}.py" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cxr."):
            found.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.Import):
            found |= {a.name.replace(".", "/") + ".py" for a in node.names if a.name[:4] == "cxr."}
    return found


def imported_closure(script: str) -> set[str]:
    seen: set[str] = set()
    todo = [REPO / script]
    while todo:
        for module in cxr_imports(todo.pop()) - seen:
            seen.add(module)
            todo.append(REPO / module)
    return seen


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_the_script_and_every_cxr_module_it_imports(name: str):
    script = f"stages/{name}.py"
    code_deps = {p for p in declared_paths(dvc_stages()[name], "deps") if p.endswith(".py")}
    assert code_deps == {script} | imported_closure(script)


@pytest.mark.parametrize("name", STAGES)
def test_paths_on_the_command_line_are_exactly_the_declared_data(name: str):
    stage = dvc_stages()[name]
    data_deps = {p for p in declared_paths(stage, "deps") if not p.endswith(".py")}
    outputs = set().union(*(declared_paths(stage, k) for k in ("outs", "metrics", "plots")))
    assert stage["cmd"].split()[:3] == ["python", "-m", f"stages.{name}"]
    assert set(stage_argv(REPO, name)) == data_deps | outputs


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
        self._reads.add(key)
        return value


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
            module = importlib.import_module(f"stages.{name}")
            found[name] = set()
            loaded = params_module.load_params(folder / "params.yaml")
            recorder = Recorder(loaded, found[name])
            monkey.setattr(module, "load_params", lambda *_, recorder=recorder: recorder)
            module.main(stage_argv(folder, name))
    finally:
        monkey.undo()
    return found


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


@pytest.mark.parametrize("name", STAGES)
def test_declared_params_are_exactly_those_the_stage_reads(reads, name: str):
    declared = [next(iter(e)) if isinstance(e, dict) else e for e in dvc_stages()[name]["params"]]
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
