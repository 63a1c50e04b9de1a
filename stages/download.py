"""Bring the dataset into data/raw in the Kaggle layout, with a manifest of every file.

Every source (demo, kaggle, url, local) ends in the same form, so later stages never know
where the images came from.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr import sources
from cxr.atomic import atomic_path
from cxr.dataset import build_manifest
from cxr.demo import generate_demo_dataset
from cxr.params import StageParams, load_params
from cxr.sources import DataParams
from cxr.stage import StageError, paths, project_root, require, run

DOWNLOAD_CACHE = Path(".cache/downloads")
LESION_COLUMNS = ["path", "x0", "y0", "x1", "y1"]


class Params(StageParams):
    data: DataParams


def local_folder(path: str) -> Path:
    """A relative `data.local_path` is relative to the project, not to the working folder,
    which for a queued experiment is a copy where ../shared/... points elsewhere."""
    return project_root() / path


def fetch(data: DataParams, dest: Path) -> pd.DataFrame:
    """Fill dest with the Kaggle layout; return the known lesion boxes (demo data only)."""
    try:
        if data.source == "demo":
            return generate_demo_dataset(
                dest,
                patients=data.demo_patients,
                seed=data.demo_seed,
                min_side=data.demo_min_side,
                max_side=data.demo_max_side,
            )
        if data.source == "local":
            sources.fetch_local(local_folder(data.local_path), dest)
        elif data.source == "kaggle":
            sources.fetch_kaggle(data.kaggle_dataset, dest)
        else:
            sources.fetch_url(data.url, data.url_sha256, dest, DOWNLOAD_CACHE)
    except sources.SourceError as err:
        raise StageError(f"data.source={data.source}: {err}") from None
    return pd.DataFrame(columns=LESION_COLUMNS)


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "checked", "raw", argv=argv)
    params = load_params(Params)
    require(args.checked)  # the validate stage has checked all of params.yaml
    with atomic_path(args.raw) as tmp:
        tmp.mkdir()
        lesions = fetch(params.data, tmp)
        manifest = build_manifest(tmp)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        lesions.to_csv(tmp / "lesions.csv", index=False)
    report(args.raw, manifest)


def report(raw: Path, manifest: pd.DataFrame) -> None:
    counts = manifest.groupby(["official_split", "label"]).size().unstack(fill_value=0)
    print(f"{raw}: {len(manifest)} files\n{counts.to_string()}")
    unreadable = manifest[~manifest["readable"]]
    for row in unreadable.itertuples():
        print(f"unreadable, excluded: {row.path} ({row.error})")


if __name__ == "__main__":
    run(main)
