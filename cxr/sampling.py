"""Which test images to spend an expensive score on: a seeded sample drawn from every class.

Used by the guard stage (its out-of-distribution set is made from these X-rays) and the
Grad-CAM stage (the maps it scores), each of which depends on nothing else here.
"""

from __future__ import annotations

import numpy as np


def scoring_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted row indices of `count` images (all if fewer) to score the maps on, seeded.

    Rows are drawn without replacement within each class, in proportion to class frequency
    (largest remainders get the rows that rounding down leaves), and every class present gets at
    least one row when `count` allows: split files are ordered by class, so the first rows would
    score one class only, and maps of NORMAL images say nothing about finding pneumonia.
    """
    labels = np.asarray(labels).ravel()
    if count < 0:
        raise ValueError(f"cannot sample {count} rows")
    if count >= labels.size:
        return np.arange(labels.size)
    classes, class_of, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    quotas = count * sizes / labels.size
    taken = np.floor(quotas).astype(int)
    taken[np.argsort(taken - quotas, kind="stable")[: count - taken.sum()]] += 1
    if count >= classes.size:
        for missing in np.flatnonzero(taken == 0):  # from the largest class, which has >= 2
            taken[np.argmax(taken)] -= 1
            taken[missing] = 1
    rng = np.random.default_rng(seed)
    rows = [
        rng.choice(np.flatnonzero(class_of == c), size=k, replace=False)
        for c, k in enumerate(taken)
    ]
    return np.sort(np.concatenate(rows))
