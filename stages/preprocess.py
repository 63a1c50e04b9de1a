"""Decode every image exactly once into square grayscale uint8 arrays, one file per split.

Training then never touches a JPEG: it reads these arrays at memory speed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from cxr.atomic import atomic_path
from cxr.params import ImageSize, StageParams, load_params
from cxr.preprocessing import PreprocessParams, decode_all, save_processed
from cxr.processed import SPLITS
from cxr.stage import StageError, paths, require, run


class Params(StageParams):
    image_size: ImageSize
    preprocess: PreprocessParams


def images_to_decode(raw: Path, split_table: Path) -> pd.DataFrame:
    """The split table's train/val/test rows, with each image's original size."""
    table = pd.read_csv(split_table, keep_default_na=False)
    manifest = pd.read_csv(raw / "manifest.csv", keep_default_na=False)
    table = table.merge(manifest[["path", "width", "height"]], on="path", validate="one_to_one")
    table = table[table["split"].isin(SPLITS)].reset_index(drop=True)
    for split in SPLITS:
        if not (table["split"] == split).any():
            raise StageError(f"{split_table}: the {split} split is empty")
    return table


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "raw", "split_table", "processed", argv=argv)
    params = load_params(Params)
    require(args.raw, args.split_table)
    table = images_to_decode(args.raw, args.split_table)
    size, resize, intensity = (
        params.image_size,
        params.preprocess.resize,
        params.preprocess.intensity,
    )

    started = time.perf_counter()
    decoded = decode_all(
        args.raw, table["path"].tolist(), size, resize, params.runtime.workers, intensity
    )
    seconds = time.perf_counter() - started
    ok = [d.pixels is not None for d in decoded]
    rejected = pd.DataFrame(
        [{"path": d.path, "error": d.error} for d in decoded if d.pixels is None],
        columns=["path", "error"],
    )

    with atomic_path(args.processed) as tmp:
        tmp.mkdir()
        pixels = [d.pixels for d in decoded if d.pixels is not None]
        save_processed(tmp, table[ok], pixels, size, resize, intensity)
        rejected.to_csv(tmp / "rejected.csv", index=False)

    for error in rejected["error"]:
        print(f"rejected: {error}")
    counts = table[ok].groupby(["split", "label"]).size().unstack(fill_value=0)
    print(
        f"{args.processed}: {sum(ok)} images in {seconds:.1f} s ({len(table) / seconds:.0f} img/s),"
        f" {len(rejected)} rejected\n{counts.to_string()}"
    )


if __name__ == "__main__":
    run(main)
