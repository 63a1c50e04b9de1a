"""What every stage script shares: one entry point that turns expected failures into messages."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cxr.params import ParamsError


class StageError(RuntimeError):
    """An expected failure (bad input, missing data) whose message says what to fix."""


def run(main: Callable[[], None]) -> None:
    """Run a stage; expected failures print one clear line instead of a traceback."""
    try:
        main()
    except (ParamsError, StageError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
