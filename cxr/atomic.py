"""Files: written all or nothing, so an interrupted stage never leaves an output that looks
complete, and known by their content.

Each output is built under a temporary sibling name and renamed into place only once it is
whole; a rename within one folder is atomic on POSIX file systems.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write a file or a folder; on success it replaces `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {target}")
        _remove(target)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def write_json(target: Path | str, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(target: Path | str, table: pd.DataFrame) -> None:
    with atomic_path(target) as tmp:
        table.to_csv(tmp, index=False)


def write_png(target: Path | str, figure: Any, dpi: int, bbox_inches: str | None = None) -> None:
    """A matplotlib figure as a PNG."""
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches=bbox_inches)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
