"""Print which stages each cxr module is a code dep of, from dvc.yaml: the stages a docstring
edit in that module makes `dvc status` report as changed.

    python tools/dep_table.py            # this checkout's dvc.yaml
    git show HEAD~1:dvc.yaml > /tmp/old.yaml && python tools/dep_table.py /tmp/old.yaml
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import yaml


def module_stages(pipeline: Path) -> dict[str, list[str]]:
    """cxr module -> the stages that declare it as a dep, in pipeline order; a foreach stage
    (member) counts once, for all its instances (member@lite0, ...)."""
    table: dict[str, list[str]] = defaultdict(list)
    for name, stage in yaml.safe_load(pipeline.read_text())["stages"].items():
        for dep in stage.get("do", stage).get("deps", []):
            if dep.startswith("cxr/") and dep.endswith(".py"):
                table[dep].append(name)
    return dict(sorted(table.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", type=Path, nargs="?", default=Path("dvc.yaml"))
    table = module_stages(parser.parse_args().pipeline)
    width = max(map(len, table))
    for module, stages in table.items():
        print(f"{module:{width}s}  {len(stages)}  {', '.join(stages)}")
    print(f"{sum(map(len, table.values()))} (module, stage) pairs over {len(table)} modules")


if __name__ == "__main__":
    main()
