"""What every stage script shares: arguments from dvc.yaml, and expected failures as messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cxr.params import ParamsError


class StageError(RuntimeError):
    """An expected failure (bad input, missing data) whose message says what to fix."""


def project_root() -> Path:
    """The project DVC runs in; `dvc exp run --queue/--temp` runs stages in a copy under
    .dvc/tmp/exps/ and names the real project in DVC_ROOT."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def queue_workers() -> int:
    """How many `dvc queue` workers are running now if this stage runs in one, else 1.

    DVC does not tell a stage the `-j` of `dvc queue start`. It runs a queued experiment in a
    copy under <project>/.dvc/tmp/exps/, and each worker it starts keeps a record,
    .dvc/tmp/exps/celery/dvc-exp-worker-<k>.json, whose returncode stays null while the worker
    lives (files of finished workers remain, with their return code). Workers stop when the
    queue is empty, so the count falls as the last experiments run.
    """
    experiments = project_root() / ".dvc" / "tmp" / "exps"
    if experiments not in Path.cwd().resolve().parents:
        return 1
    alive = 0
    for record in experiments.glob("celery/dvc-exp-worker-*.json"):
        try:
            worker = json.loads(record.read_text())
            os.kill(worker["pid"], 0)  # raises if no such process
        except (OSError, ValueError, KeyError, TypeError):
            continue
        alive += worker.get("returncode") is None
    return max(1, alive)


def paths(doc: str, *names: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths, given on its command line in dvc.yaml, the one place they are stated."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    for name in names:
        parser.add_argument(name, type=Path)
    return parser.parse_args(argv)


def require(*inputs: Path) -> None:
    """Fail with the stage that makes a missing input, before any work starts."""
    for path in inputs:
        if not path.exists():
            raise StageError(f"{path} not found: run `dvc repro` to build the stages before this")


def run(main: Callable[[], None]) -> None:
    """Run a stage; the project's own expected failures print one line, bugs keep a traceback."""
    try:
        main()
    except (ParamsError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
