"""The memory arithmetic of docs/scaling.md: uint8 bytes per split of the chest X-ray datasets
people move to after Kermany, and whether the train stage holds them on one GPU or streams them.

The train stage holds train + val on the device when their bytes fit in the memory budget
(`runtime.memory_budget_gb`; 0 = half of the device's memory, cxr/device.py), else it streams
batches from the memory-mapped arrays. Each DDP process holds its own copy on its own GPU.

    python tools/dataset_memory.py                 # 80 GB GPUs (A100/H100 80GB)
    python tools/dataset_memory.py --gpu-gb 24 --sizes 224 320 512
"""

from __future__ import annotations

import argparse

# Images per official split. Kermany: Kaggle's folders. CheXpert v1.0: train + valid, and the
# 668-image test set released with CheXlocalize. MIMIC-CXR-JPG 2.0.0: mimic-cxr-2.0.0-split.
DATASETS = {
    "Kermany (this project)": {"train": 5216, "val": 16, "test": 624},
    "CheXpert": {"train": 223414, "val": 234, "test": 668},
    "MIMIC-CXR-JPG": {"train": 368960, "val": 2991, "test": 5159},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory, decimal GB")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    args = parser.parse_args()
    gpu = args.gpu_gb * 1e9
    budget = gpu / 2  # runtime.memory_budget_gb: 0
    print(f"GPU {args.gpu_gb:g} GB, default budget {budget / 1e9:g} GB (half); GB = 1e9 bytes")
    print("| dataset | px | images | train GB | val GB | test GB | train+val | on one GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, splits in DATASETS.items():
        for size in args.sizes:
            each = size * size  # bytes of one uint8 grayscale image
            gb = {split: n * each / 1e9 for split, n in splits.items()}
            held = (splits["train"] + splits["val"]) * each
            verdict = (
                "held (default budget)" if held <= budget
                else "streamed (fits the GPU, not the budget)" if held <= gpu
                else "streamed (larger than the GPU)"
            )  # fmt: skip
            print(
                f"| {name} | {size} | {sum(splits.values()):,} | {gb['train']:.2f} | "
                f"{gb['val']:.2f} | {gb['test']:.2f} | {held / 1e9:.2f} | {verdict} |"
            )


if __name__ == "__main__":
    main()
