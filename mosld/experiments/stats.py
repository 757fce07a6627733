"""Statistics for comparing methods on the same test items: mean and s.d. over seeds, paired bootstrap
intervals of the difference in macro-average accuracy (over items only, and over seeds and items), the
smallest difference a comparison can detect, and the exact McNemar test.

Correctness is held as ``{task: array (seeds, items)}`` of 0/1, with the same item order (and seeds) for
both methods of a comparison, so every statistic is paired by item and seed. A generation task's items hold
their score in [0, 1] instead: the means and bootstraps take it as it is; McNemar's test needs 0/1 results
(``mosld.experiments.metrics.is_binary``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

Correctness = Mapping[str, np.ndarray]  # task -> (seeds, items) of 0/1 (or generation scores in [0, 1])
_CHUNK = 250  # bootstrap resamples drawn at a time


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


def _differences(a: Correctness, b: Correctness, caller: str) -> dict[str, np.ndarray]:
    """Per (seed, item) differences ``a - b``; either may have one row (one reference run, e.g. the base model,
    which has no seeds), compared with every seed of the other."""
    if set(a) != set(b):
        raise ValueError(f"{caller}: the methods were tested on different tasks: {sorted(a)} vs {sorted(b)}")
    out = {}
    for task in sorted(a):
        rows = (len(a[task]), len(b[task]))
        if a[task].shape[1:] != b[task].shape[1:] or (rows[0] != rows[1] and 1 not in rows):
            raise ValueError(f"{caller}: task {task!r} has shapes {a[task].shape} and {b[task].shape}")
        out[task] = np.asarray(a[task], dtype=float) - np.asarray(b[task], dtype=float)
    return out


def hierarchical_resamples(a: Correctness, b: Correctness, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of the macro-average difference ``a - b`` over seeds and items.

    Each resample draws the seeds with replacement (one draw for all tasks: a seed is a training run), then
    each task's items with replacement, the same items for every drawn seed and both methods (the design is
    crossed: every seed is tested on the same items). This is the two-way "pigeonhole" bootstrap (Owen 2007,
    Ann. Appl. Stat. 1:2): it counts the seed-to-seed and the item-to-item variation, and errs on the wide
    side for the seed x item interaction; with few seeds its seed part is narrow by a factor
    sqrt((seeds - 1) / seeds), as any bootstrap of that many values is. With one seed it is the item-only
    bootstrap (``paired_bootstrap``).
    """
    diffs = _differences(a, b, "hierarchical_bootstrap")
    rng = np.random.default_rng(seed)
    seeds = max(len(d) for d in diffs.values())
    out = []
    for start in range(0, resamples, _CHUNK):  # in chunks: a full test split's item weights are large
        n = min(_CHUNK, resamples - start)
        seed_weights = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=n) / seeds  # (n, seeds)
        total = np.zeros(n)
        for diff in diffs.values():
            d = np.broadcast_to(diff, (seeds, diff.shape[1]))
            items = d.shape[1]
            item_weights = rng.multinomial(items, np.full(items, 1 / items), size=n) / items
            total += ((item_weights @ d.T) * seed_weights).sum(axis=1)  # per resample: weighted mean over both
        out.append(total / len(diffs))
    return np.concatenate(out)


def hierarchical_bootstrap(
    a: Correctness, b: Correctness, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Difference of macro-average accuracy ``a - b`` and its interval over seeds and items
    (``hierarchical_resamples``).

    Returns:
        (difference, low, high) with ``level`` coverage between low and high.
    """
    diffs = hierarchical_resamples(a, b, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return _macro_difference(a, b), float(low), float(high)


def _macro_difference(a: Correctness, b: Correctness) -> float:
    return float(np.mean([np.mean(a[t]) - np.mean(b[t]) for t in sorted(a)]))


def detectable_difference(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at ``alpha`` detects with probability ``power``, for an
    estimate with standard error ``se`` (normal approximation): ``(z_{1 - alpha/2} + z_power) * se``, 2.80 se
    at the defaults."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * se


@dataclass(frozen=True)
class Comparison:
    """A paired comparison ``a - b``: the difference, its 95% intervals over seeds and items (``seeds``) and
    over items only (``items``), the standard error over seeds and items, and the smallest difference
    detectable at 80% power (alpha 0.05) with that error."""

    diff: float
    seeds: tuple[float, float]
    items: tuple[float, float]
    se: float
    detectable: float

    def verdict(self) -> str:
        """``holds`` (the seed-aware interval above 0), ``is reversed`` (below) or ``is within noise``."""
        low, high = self.seeds
        return "holds" if low > 0 else "is reversed" if high < 0 else "is within noise"


def compare(a: Correctness, b: Correctness, resamples: int = 2000, seed: int = 0) -> Comparison:
    """``a - b`` with both intervals (``hierarchical_bootstrap`` and ``paired_bootstrap``) at 95%."""
    resampled = hierarchical_resamples(a, b, resamples, seed)
    low, high = np.quantile(resampled, [0.025, 0.975])
    # one reference run against every seed: the item-only bootstrap pairs it with each seed's row
    shape = {t: (max(len(a[t]), len(b[t])), a[t].shape[1]) for t in a}
    a_rows, b_rows = ({t: np.broadcast_to(x[t], shape[t]) for t in x} for x in (a, b))
    _, item_low, item_high = paired_bootstrap(a_rows, b_rows, resamples, seed)
    se = float(resampled.std(ddof=1))
    return Comparison(_macro_difference(a, b), (float(low), float(high)), (item_low, item_high), se,
                      detectable_difference(se))  # fmt: skip


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
