"""Statistics for comparing methods on the same test items: mean and s.d. over seeds, paired bootstrap
intervals of the difference in macro-average accuracy (over items only, and over seeds and items; of balanced
accuracy too), the bootstrap p-value and Holm's adjustment, the Monte Carlo error of interval ends and
p-values (so that a verdict does not hang on the resampling seed), the smallest difference a comparison can
detect, and the exact McNemar test (two runs of one seed each).

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
Gold = Mapping[str, np.ndarray]  # task -> (items,) gold class of each item, for balanced accuracy
_CHUNK = 250  # bootstrap resamples drawn at a time
RESAMPLES = 10_000  # a comparison's resamples; a borderline one is drawn again with ESCALATED
ESCALATED = 100_000
MC_LEVEL = 0.99  # coverage of the Monte Carlo bands of interval ends and p-values


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


def _class_masks(diffs: Mapping[str, np.ndarray], gold: Gold | None) -> dict[str, np.ndarray | None]:
    """Per task, (classes present, items) 0/1 membership of each gold class, or None (a plain mean)."""
    out = {}
    for task, diff in diffs.items():
        labels = None if gold is None else gold.get(task)
        if labels is None:
            out[task] = None
            continue
        labels = np.asarray(labels)
        if labels.shape != (diff.shape[1],):
            raise ValueError(f"balanced accuracy: task {task!r} has {diff.shape[1]} items but {labels.shape} labels")
        out[task] = (labels[None, :] == np.unique(labels)[:, None]).astype(float)
    return out


def _resample_weights(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """(resamples, size): how often each of ``size`` units is drawn in each resample (``size`` draws with
    replacement), divided by ``size``. Counted from drawn indices: 8x faster than ``rng.multinomial`` here."""
    picks = rng.integers(0, size, (resamples, size)) + size * np.arange(resamples)[:, None]
    return np.bincount(picks.ravel(), minlength=resamples * size).reshape(resamples, size) / size


def hierarchical_resamples(
    a: Correctness, b: Correctness, resamples: int = 2000, seed: int = 0, gold: Gold | None = None
) -> np.ndarray:
    """Bootstrap distribution of the macro-average difference ``a - b`` over seeds and items.

    Each resample draws the seeds with replacement (one draw for all tasks: a seed is a training run), then
    each task's items with replacement, the same items for every drawn seed and both methods (the design is
    crossed: every seed is tested on the same items). This is the two-way "pigeonhole" bootstrap (Owen 2007,
    Ann. Appl. Stat. 1:2): it counts the seed-to-seed and the item-to-item variation, and errs on the wide
    side for the seed x item interaction; with few seeds its seed part is narrow by a factor
    sqrt((seeds - 1) / seeds), as any bootstrap of that many values is. With one seed it is the item-only
    bootstrap (``paired_bootstrap``).

    With ``gold`` (task -> the gold class of each item), a task's statistic is the difference of *balanced*
    accuracy, the mean over gold classes of the recall, recomputed in every resample as a ratio: each class's
    resampled sum of differences over its resampled item count (a class no item of a resample has is left out
    of that resample's mean).
    """
    diffs = _differences(a, b, "hierarchical_bootstrap")
    masks = _class_masks(diffs, gold)
    rng = np.random.default_rng(seed)
    seeds = max(len(d) for d in diffs.values())
    out = []
    for start in range(0, resamples, _CHUNK):  # in chunks: a full test split's item weights are large
        n = min(_CHUNK, resamples - start)
        seed_weights = _resample_weights(rng, seeds, n)  # (n, seeds)
        total = np.zeros(n)
        for task, diff in diffs.items():
            d = np.broadcast_to(diff, (seeds, diff.shape[1]))
            item_weights = _resample_weights(rng, d.shape[1], n)  # (n, items)
            if masks[task] is None:
                total += ((item_weights @ d.T) * seed_weights).sum(axis=1)  # per resample: weighted mean over both
                continue
            recalls = []
            for member in masks[task]:  # one gold class: its weighted sum over its weighted count
                weighted = item_weights * member
                count = weighted.sum(axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    recalls.append(((weighted @ d.T) * seed_weights).sum(axis=1) / count)
            total += np.nanmean(np.array(recalls), axis=0)
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


def _macro_difference(a: Correctness, b: Correctness, gold: Gold | None = None) -> float:
    """Mean over tasks of the difference of accuracy (of balanced accuracy for the tasks in ``gold``)."""
    diffs = _differences(a, b, "difference")
    masks = _class_masks(diffs, gold)
    per_task = []
    for task, diff in diffs.items():
        per_item = diff.mean(axis=0)
        member = masks[task]
        per_task.append(per_item.mean() if member is None else np.mean(member @ per_item / member.sum(axis=1)))
    return float(np.mean(per_task))


def detectable_difference(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at ``alpha`` detects with probability ``power``, for an
    estimate with standard error ``se`` (normal approximation): ``(z_{1 - alpha/2} + z_power) * se``, 2.80 se
    at the defaults."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * se


def quantile_band(ordered: np.ndarray, q: float, level: float = MC_LEVEL) -> tuple[float, float]:
    """Where the ``q`` quantile of the bootstrap distribution lies, given ``ordered`` (B sorted resamples): the
    order statistics at ranks ``B q -+ z sqrt(B q (1 - q))``. This is the Monte Carlo error of an interval end
    (another bootstrap seed moves the end within it with probability ``level``), distribution-free: the count
    of resamples below the true quantile is binomial(B, q)."""
    n = len(ordered)
    spread = NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(n * q * (1 - q))
    low, high = math.floor(n * q - spread), math.ceil(n * q + spread)
    return float(ordered[max(low, 0)]), float(ordered[min(high, n - 1)])


def bootstrap_p(resampled: np.ndarray, level: float = MC_LEVEL) -> tuple[float, tuple[float, float]]:
    """Two-sided p-value of "no difference" from the bootstrap distribution, and its Monte Carlo band.

    ``p = 2 min(share of resamples <= 0, share >= 0)``, with the +1 of a Monte Carlo test ((k + 1) / (B + 1)):
    the level at which the percentile interval would just reach 0, so ``p < 0.05`` exactly when the 95% interval
    excludes 0 (up to that +1). It respects the seeds as the interval does: seeds and items are resampled
    together, the same items for every seed, where the pooled McNemar test took every (seed, item) pair as an
    independent one. The band is the binomial error of the tail share at ``level``.
    """
    n = len(resampled)
    tail = min(int((resampled <= 0).sum()), int((resampled >= 0).sum()))
    share = (tail + 1) / (n + 1)
    spread = NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(share * (1 - share) / n)
    return min(1.0, 2 * share), (max(0.0, 2 * (share - spread)), min(1.0, 2 * (share + spread)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error): ``max over j <= i of min(1, (m - j + 1) p_(j))`` in the
    order of the sorted p-values, returned in the input order. By hand: scipy has only the false discovery rate
    (``false_discovery_control``) and statsmodels is not a dependency."""
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Comparison:
    """A paired comparison ``a - b``: the difference, its 95% intervals over seeds and items (``seeds``) and
    over items only (``items``), the standard error over seeds and items, the smallest difference detectable at
    80% power (alpha 0.05) with that error, the bootstrap p-value (seeds and items), and the Monte Carlo bands
    (99%) of the seed-aware interval's ends and of the p-value, from ``resamples`` resamples."""

    diff: float
    seeds: tuple[float, float]
    items: tuple[float, float]
    se: float
    detectable: float
    p: float = 1.0
    resamples: int = 0
    low_band: tuple[float, float] = (0.0, 0.0)
    high_band: tuple[float, float] = (0.0, 0.0)
    p_band: tuple[float, float] = (1.0, 1.0)

    def verdict(self) -> str:
        """``holds`` (the seed-aware interval above 0), ``is reversed`` (below), ``is within noise`` (it holds 0),
        or ``is borderline`` when the Monte Carlo band of an interval end holds 0: another bootstrap seed could
        turn the verdict."""
        if self.low_band[0] > 0:
            return "holds"
        if self.high_band[1] < 0:
            return "is reversed"
        return "is borderline" if self.unsettled_end() else "is within noise"

    def unsettled_end(self) -> str | None:
        """``lower`` or ``upper``: the end of the seed-aware interval whose Monte Carlo band has 0 inside it (so
        that another bootstrap seed could put the end on the other side of 0), else ``None``."""
        if self.low_band[0] <= 0 < self.low_band[1]:
            return "lower"
        if self.high_band[0] < 0 <= self.high_band[1]:
            return "upper"
        return None

    def place(self, value: float) -> str:
        """Where ``value`` (e.g. the paper's effect) lies against the seed-aware interval: ``above``, ``below``,
        ``inside``, or ``at the edge`` (within the Monte Carlo band of an end)."""
        if value > self.high_band[1]:
            return "above"
        if value < self.low_band[0]:
            return "below"
        if self.low_band[1] <= value <= self.high_band[0]:
            return "inside"
        return "at the edge"


def compare(
    a: Correctness,
    b: Correctness,
    resamples: int = RESAMPLES,
    seed: int = 0,
    gold: Gold | None = None,
    escalate_to: int = ESCALATED,
    reference: float | None = None,
) -> Comparison:
    """``a - b`` with both intervals (``hierarchical_resamples`` and ``paired_bootstrap``) at 95%, the bootstrap
    p-value and the Monte Carlo bands of both. Where the verdict comes out borderline, or ``reference`` (the
    paper's effect, to be placed against the interval) lies at the edge, the comparison is drawn again with
    ``escalate_to`` resamples (the bands narrow as 1 / sqrt(resamples)) and that one is returned.
    ``gold``: compare balanced accuracy on the tasks it names (``hierarchical_resamples``)."""
    result = _compare(a, b, resamples, seed, gold)
    unsettled = result.verdict() == "is borderline" or (
        reference is not None and result.place(reference) == "at the edge"
    )
    if unsettled and escalate_to > resamples:
        result = _compare(a, b, escalate_to, seed, gold)
    return result


@dataclass(frozen=True)
class Bootstrap:
    """How a page resamples: ``resamples`` per comparison (``ESCALATED`` where a verdict is borderline or the
    paper's effect at the edge) and the seed of every comparison's random draws."""

    resamples: int = RESAMPLES
    seed: int = 0

    def compare(
        self, a: Correctness, b: Correctness, gold: Gold | None = None, reference: float | None = None
    ) -> Comparison:
        return compare(a, b, self.resamples, self.seed, gold, max(ESCALATED, self.resamples), reference)


def _compare(a: Correctness, b: Correctness, resamples: int, seed: int, gold: Gold | None) -> Comparison:
    resampled = np.sort(hierarchical_resamples(a, b, resamples, seed, gold))
    low, high = np.quantile(resampled, [0.025, 0.975])
    # one reference run against every seed: the item-only bootstrap pairs it with each seed's row
    shape = {t: (max(len(a[t]), len(b[t])), a[t].shape[1]) for t in a}
    a_rows, b_rows = ({t: np.broadcast_to(x[t], shape[t]) for t in x} for x in (a, b))
    if gold:  # balanced accuracy's item-only interval: the same resampling with the seeds held fixed
        fixed = {t: x.mean(axis=0, keepdims=True) for t, x in _differences(a_rows, b_rows, "compare").items()}
        zeros = {t: np.zeros_like(x) for t, x in fixed.items()}
        item_low, item_high = np.quantile(hierarchical_resamples(fixed, zeros, resamples, seed, gold), [0.025, 0.975])
    else:
        _, item_low, item_high = paired_bootstrap(a_rows, b_rows, resamples, seed)
    se = float(resampled.std(ddof=1))
    p, p_band = bootstrap_p(resampled)
    return Comparison(
        diff=_macro_difference(a, b, gold),
        seeds=(float(low), float(high)),
        items=(float(item_low), float(item_high)),
        se=se,
        detectable=detectable_difference(se),
        p=p,
        resamples=resamples,
        low_band=quantile_band(resampled, 0.025),
        high_band=quantile_band(resampled, 0.975),
        p_band=p_band,
    )


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
    # By hand: exact integers, correctly rounded; scipy's binomtest agrees to ~3e-14, refuses n = 0, isn't a dependency
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
