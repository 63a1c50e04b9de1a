"""Decode every image exactly once into square grayscale uint8 arrays, one file per split.

Training then never touches a JPEG: it reads these arrays at memory speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.atomic import atomic_path
from cxr.params import load_params
from cxr.processed import PROCESSED_DIR, SPLITS, decode_all, normalization_stats
from cxr.stage import StageError, run

RAW_DIR = Path("data/raw")
SPLIT_TABLE = Path("data/splits/split.csv")


def main() -> None:
    params = load_params()
    table = pd.read_csv(SPLIT_TABLE, keep_default_na=False)
    manifest = pd.read_csv(RAW_DIR / "manifest.csv", keep_default_na=False)
    table = table.merge(manifest[["path", "width", "height"]], on="path", validate="one_to_one")
    table = table[table["split"].isin(SPLITS)].reset_index(drop=True)
    for split in SPLITS:
        if not (table["split"] == split).any():
            raise StageError(f"{SPLIT_TABLE}: the {split} split is empty")

    size, mode = params.image_size, params.preprocess.resize
    started = time.perf_counter()
    decoded = decode_all(RAW_DIR, table["path"].tolist(), size, mode, params.preprocess.workers)
    seconds = time.perf_counter() - started
    ok = np.array([d.pixels is not None for d in decoded])
    rejected = pd.DataFrame(
        [{"path": d.path, "error": d.error} for d in decoded if d.pixels is None],
        columns=["path", "error"],
    )

    with atomic_path(PROCESSED_DIR) as tmp:
        tmp.mkdir()
        index = table[ok].copy()
        pixels = [d.pixels for d in decoded if d.pixels is not None]
        index["row"] = index.groupby("split").cumcount()
        for split in SPLITS:
            rows = np.flatnonzero(index["split"].to_numpy() == split)
            images = np.stack([pixels[i] for i in rows]) if len(rows) else np.empty((0, size, size))
            np.save(tmp / f"{split}.npy", images.astype(np.uint8))
            if split == "train":
                mean, std = normalization_stats(images)
        index[["split", "row", "path", "label", "patient_id", "width", "height"]].to_csv(
            tmp / "index.csv", index=False
        )
        rejected.to_csv(tmp / "rejected.csv", index=False)
        stats = {"image_size": size, "resize": mode, "mean": mean, "std": std}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    for row in rejected.itertuples():
        print(f"rejected: {row.error}")
    counts = index.groupby(["split", "label"]).size().unstack(fill_value=0)
    print(
        f"{PROCESSED_DIR}: {len(index)} images in {seconds:.1f} s "
        f"({len(table) / seconds:.0f} img/s), {len(rejected)} rejected\n{counts.to_string()}"
    )


if __name__ == "__main__":
    run(main)
