"""What every stage script shares: arguments from dvc.yaml, and expected failures as messages."""

from __future__ import annotations

import argparse
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
