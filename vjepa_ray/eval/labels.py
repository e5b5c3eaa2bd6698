"""Label-efficiency subsets: a stratified, exact fraction of a labelled training set."""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np


def stratified_subset(labels: Sequence[Hashable], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction * n_c)`` examples of every class c (at least one per class).

    Exact per class (not in expectation), so small fractions keep every class; the draw within a class
    is uniform and depends only on ``seed``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a value in (0, 1], got {fraction}")
    by_class: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_class, key=str):
        members = np.asarray(by_class[label])
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=keep, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
