"""Re-split official train+val into train and validation, grouped by patient, stratified."""

from __future__ import annotations

import pandas as pd

from cxr.atomic import write_csv, write_json
from cxr.params import StageParams, load_params
from cxr.splitting import (
    SplitParams,
    count_test_patient_collisions,
    split_dataset,
    split_report,
)
from cxr.stage import paths, require, run


class Params(StageParams):
    split: SplitParams


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "manifest", "splits", argv=argv)
    params = load_params(Params)
    require(args.manifest)
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    table = split_dataset(
        manifest,
        val_fraction=params.split.val_fraction,
        seed=params.split.seed,
        drop_test_patient_overlap=params.split.drop_test_patient_overlap,
        fold=params.split.fold,
    )
    report = split_report(table)
    report["test_patient_id_collisions"] = count_test_patient_collisions(manifest)
    write_csv(args.splits / "split.csv", table)
    write_json(args.splits / "report.json", report)
    print(pd.DataFrame(report["images"]).T.to_string())
    print(f"patients: {report['patients']}  excluded: {report['excluded']}")
    print(f"overlaps: {report['overlap']}")


if __name__ == "__main__":
    run(main)
