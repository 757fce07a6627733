"""Statistics for comparing methods on the same test items: mean and s.d. over seeds, a paired bootstrap
interval of the difference in macro-average accuracy, and the exact McNemar test.

Correctness is held as ``{task: array (seeds, items)}`` of 0/1, with the same item order (and seeds) for
both methods of a comparison, so every statistic is paired by item and seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Correctness = Mapping[str, np.ndarray]  # task -> (seeds, items) of 0/1


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def macro_accuracy(correct: Correctness) -> float:
    """Mean over tasks of each task's accuracy (averaged over seeds and items)."""
    return float(np.mean([c.mean() for c in correct.values()]))


def paired_bootstrap(
    a: Correctness, b: Correctness, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Difference of macro-average accuracy ``a - b`` and its bootstrap interval.

    Each resample draws every task's test items with replacement (the task sizes stay fixed) and keeps
    an item's results in all seeds and both methods together, so the interval reflects which items
    happened to be in the test sample, paired across methods.

    Returns:
        (difference, low, high) with ``level`` coverage between low and high.
    """
    if set(a) != set(b):
        raise ValueError(f"paired_bootstrap: the methods were tested on different tasks: {sorted(a)} vs {sorted(b)}")
    rng = np.random.default_rng(seed)
    diffs = np.zeros(resamples)
    for task in sorted(a):
        if a[task].shape != b[task].shape:
            raise ValueError(f"paired_bootstrap: task {task!r} has shapes {a[task].shape} and {b[task].shape}")
        per_item = (a[task] - b[task]).mean(axis=0)  # mean over seeds: (items,)
        picks = rng.integers(0, len(per_item), size=(resamples, len(per_item)))
        diffs += per_item[picks].mean(axis=1)
    diffs /= len(a)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return macro_accuracy(a) - macro_accuracy(b), float(low), float(high)


def mcnemar_exact(a: Correctness, b: Correctness) -> tuple[int, int, float]:
    """Exact (binomial) McNemar test over all (seed, item) pairs of all tasks.

    Returns:
        (``n_ab``: a right and b wrong, ``n_ba``: b right and a wrong, two-sided p-value).
    """
    n_ab = int(sum(((a[t] == 1) & (b[t] == 0)).sum() for t in a))
    n_ba = int(sum(((a[t] == 0) & (b[t] == 1)).sum() for t in a))
    return n_ab, n_ba, binomial_two_sided(min(n_ab, n_ba), n_ab + n_ba)


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided p-value of ``k`` or fewer successes (the smaller count) in ``n`` fair coin flips."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
