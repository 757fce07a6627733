"""The results page's paired statistics: seed-aware comparisons of methods, and the out-of-domain and
forgetting section (each run and method against the base, methods against each other, the label prior).

A comparison's interval is the hierarchical bootstrap over seeds and items (``stats.compare``), with the
item-only paired bootstrap beside it, labelled. Records that lack a task are left out of that task's
statistics, and the page says which.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from .claims import METHOD_ORDER, NAMES, Claim, interval, p_text, paper_difference, points
from .metrics import headline
from .stats import MC_LEVEL, Bootstrap, Comparison, mean_sd

# The labels a task's predictions are read as (the index of the choice): BoolQ's choices are ["no", "yes"].
LABELS = {"boolq": ["no", "yes"], "mmlu": ["A", "B", "C", "D"]}

Runs = list[dict]


def correctness(runs: Runs, tasks: list[str], items: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """``{task: (runs, items)}`` of 0/1 (a generation task: scores in [0, 1]) on the given item order."""
    return {t: np.array([[r["predictions"][(t, i)] for i in items[t]] for r in runs], dtype=float) for t in tasks}


def with_task(runs: Runs, task: str) -> Runs:
    return [r for r in runs if task in r["tasks"]]


def common_seeds(a: Runs, b: Runs) -> tuple[Runs, Runs]:
    """The runs of ``a`` and ``b`` of the seeds both have (a base group of one run pairs with every seed)."""
    if len(b) == 1 and b[0]["method"] == "base":
        return a, b
    seeds = {r["seed"] for r in a} & {r["seed"] for r in b}
    return [r for r in a if r["seed"] in seeds], [r for r in b if r["seed"] in seeds]


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def comparison_cells(c: Comparison) -> list[str]:
    """Difference, seed-aware interval (marked where borderline), item-only interval, smallest detectable
    difference (points), bootstrap p-value."""
    mark = " (borderline)" if c.verdict() == "is borderline" else ""
    return [points(c.diff), interval(c.seeds) + mark, interval(c.items), f"{100 * c.detectable:.1f}", p_text(c.p)]


COMPARISON_HEADER = ["difference", "95% interval, seeds + items", "95% interval, items only", "detectable", "p"]
INTERVALS_NOTE = (
    "Intervals: *seeds + items* is a hierarchical paired bootstrap (each resample draws the seeds with "
    "replacement, then every task's test items with replacement, the same items for every drawn seed and both "
    "methods; the two-way bootstrap of Owen 2007); it is the one verdicts use. *Items only* holds the seeds "
    "fixed (each item's results averaged over seeds), as this page used to: too narrow when seeds disagree. "
    "*p*: the bootstrap p-value of no difference from the same resamples (twice the smaller share of resampled "
    "differences on either side of 0), so p < 0.05 exactly where the seeds + items interval excludes 0; it "
    "respects the seeds, where McNemar's test over pooled (seed, item) pairs took the same item in three seeds "
    f"for three independent pairs. An interval marked *borderline* has an end whose {MC_LEVEL:.0%} Monte Carlo band "
    "(another bootstrap seed moves the end within it) holds 0. "
    "*Detectable*: the smallest true difference this comparison detects with 80% power at alpha 0.05, "
    "2.80 x the seed-aware standard error (the s.d. of the resampled differences; normal approximation). "
    "The seed-aware interval errs on the wide side: it counts the seed x item noise about three times. In a "
    "simulation shaped like the cpu protocol (3 seeds, 300 items of 0/1 results; "
    "`test_hierarchical_standard_error_errs_on_the_wide_side_in_a_crossed_simulation`) its standard error "
    "came out 1.2-1.3x the true one with a seed effect of 3 points (1.45x without), the item-only one 0.76x "
    "(1.0x without): verdicts err toward *within noise*, and *detectable* is an upper bound."
)


def gold_labels(runs: Runs, task: str, items: list[str]) -> np.ndarray:
    """The gold class of each item (for balanced accuracy: the mean over gold classes of the recall, so that
    a constant answer scores 1/classes whatever the gold labels' prior; the bootstrap recomputes the recalls
    in every resample, ``stats.hierarchical_resamples``)."""
    return np.array([runs[0]["answers"][(task, i)][1] for i in items])


def balanced_accuracy(run: dict, task: str, items: list[str], gold: np.ndarray) -> float:
    """One run's balanced accuracy on ``items``: the mean over the gold classes present of the recall."""
    correct = np.array([run["predictions"][(task, i)] for i in items], dtype=float)
    return float(np.mean([correct[gold == c].mean() for c in np.unique(gold)]))


def answer_shares(runs: Runs, task: str, items: list[str], classes: int, column: int = 0) -> np.ndarray:
    """Share of each answer among the predictions (``column`` 0) or the gold labels (1), mean over runs."""
    shares = [
        np.bincount([r["answers"][(task, i)][column] for i in items], minlength=classes)[:classes] / len(items)
        for r in runs
    ]
    return np.mean(shares, axis=0)


def prior_text(task: str, shares: np.ndarray) -> str:
    labels = LABELS.get(task, [str(k) for k in range(len(shares))])
    if labels == ["no", "yes"]:
        return f"{pct(shares[1])}% yes"
    return " / ".join(f"{label} {pct(s)}" for label, s in zip(labels, shares, strict=False))


# The paper's out-of-domain claims: (the comparison's label starts with, what it claims). The paper shows MMLU in a
# figure only: no number to set against ours.
OOD_CLAIMS = (
    ("MoSLD − LoRA", "MoSLD forgets less than LoRA"),
    ("MoSLD − base (zero-shot)", "MoSLD generalises out of domain: no loss against the base"),
)


def _ood_task_data(groups: dict, keys: list, task: str) -> tuple[Runs, list[str], dict, np.ndarray | None]:
    """An out-of-domain task's records that have it, its items, the groups that have it, and the gold class of
    each item (``None`` for a generation task: free text has no answer prior)."""
    tested = with_task([r for k in keys for r in groups[k]], task)
    if not tested:
        return [], [], {}, None
    items = sorted(i for (t, i) in tested[0]["predictions"] if t == task)
    present = {k: with_task(groups[k], task) for k in keys if with_task(groups[k], task)}
    generation = any((task, i) not in r["answers"] for r in tested for i in items)
    return tested, items, present, None if generation else gold_labels(tested, task, items)


def ood_claims(groups: dict, keys: list, ood: list[str], boot: Bootstrap) -> list[Claim]:
    """The paper's out-of-domain claims (``OOD_CLAIMS``) on every out-of-domain task that has records of both."""
    claims = []
    for task in ood:
        _, items, present, gold = _ood_task_data(groups, keys, task)
        wanted = tuple(prefix for prefix, _ in OOD_CLAIMS)
        comparisons = _ood_comparisons(present, task, items, gold, boot, wanted=wanted)
        for prefix, text in OOD_CLAIMS:
            for label in (label for label in comparisons if label.startswith(prefix)):
                plain, balanced, seeds = comparisons[label]
                claims.append(Claim(text, task, label, plain, balanced=balanced, seeds=seeds))
    return claims


def ood_section(groups: dict, keys: list, ood: list[str], boot: Bootstrap, claims: list[Claim]) -> list[str]:
    """The "Out-of-domain and forgetting" section, one block per out-of-domain task (the comparisons of
    ``claims`` are not drawn again)."""
    lines = ["", "## Out-of-domain and forgetting", ""]
    lines += [
        "Tasks never trained on, tested in every run: what training cost there (each run and method against the "
        "zero-shot base) and which method lost least (methods against each other). Beside the accuracy, the "
        "label prior: the share of each answer among the predictions (mean over seeds) against the gold "
        "labels, and the *balanced accuracy* (the mean over gold labels of the recall, 50% for any constant "
        "yes/no answer and 25% for any constant letter), which removes what a model gains or loses only by "
        "moving toward or away from the majority answer; it does not remove the bias itself. Its intervals "
        "recompute the recalls in every resample. Intervals, *detectable* and *p* as in the paired comparisons "
        "above.",
    ]
    known = {(c.where, c.label): (c.comparison, c.balanced, c.seeds) for c in claims}
    for task in ood:
        lines += _ood_task(groups, keys, task, boot, known)
    return lines


def _ood_task(groups: dict, keys: list, task: str, boot: Bootstrap, known: dict) -> list[str]:
    everyone = [r for k in keys for r in groups[k]]
    tested, items, present, gold_classes = _ood_task_data(groups, keys, task)
    lines = ["", f"### {task}", ""]
    lacking = [r["run"] for r in everyone if task not in r["tasks"]]
    lines.append(
        f"Tested in {len(tested)} of {len(everyone)} records"
        + (f"; lacking it (left out below): {', '.join(lacking)}." if lacking else ".")
    )
    if not tested:
        return lines
    known = {label: value for (where, label), value in known.items() if where == task}
    if gold_classes is None:
        return _ood_generation_task(lines, present, task, items, boot, known)
    classes = len(LABELS.get(task, [])) or 1 + max(r["answers"][(task, i)][1] for r in tested for i in items)
    gold = answer_shares(tested, task, items, classes, column=1)
    lines += ["", f"{len(items)} items; gold labels: {prior_text(task, gold)}.", ""]
    lines += ["| method | seeds | accuracy | balanced accuracy | predicted answers |", "|---|---|---|---|---|"]
    for (method, _), runs in present.items():
        acc = [headline(r["tasks"][task]) for r in runs]
        bal = [balanced_accuracy(r, task, items, gold_classes) for r in runs]
        lines.append(
            f"| {NAMES.get(method, method)} | {len(runs)} | {_cell(acc)} | {_cell(bal)} | "
            f"{prior_text(task, answer_shares(runs, task, items, classes))} |"
        )
    comparisons = _ood_comparisons(present, task, items, gold_classes, boot, known=known)
    lines += ["", "| comparison | " + " | ".join(COMPARISON_HEADER) + " | balanced: difference | balanced: "
              "95% interval, seeds + items |", "|---|" + "---|" * 7]  # fmt: skip
    for label, (plain, balanced, _) in comparisons.items():
        lines.append(f"| {label} | " + " | ".join(comparison_cells(plain)) + f" | {points(balanced.diff)} | "
                     f"{interval(balanced.seeds)} |")  # fmt: skip
    between = [(seeds, c.detectable) for label, (c, _, seeds) in comparisons.items() if "base" not in label]
    lines += power_line(between, f"{task} accuracy between methods")
    return lines + _per_run_rows(present, task, items, boot)


def _ood_generation_task(lines: list[str], present: dict, task: str, items: list[str], boot: Bootstrap,
                         known: dict) -> list[str]:  # fmt: skip
    """An out-of-domain generation task's block: its metric per method and the paired comparisons (no label
    prior: the answers are free text)."""
    lines += ["", f"{len(items)} items, scored on the generated text.", ""]
    lines += ["| method | seeds | score |", "|---|---|---|"]
    for (method, _), runs in present.items():
        lines.append(
            f"| {NAMES.get(method, method)} | {len(runs)} | {_cell([headline(r['tasks'][task]) for r in runs])} |"
        )
    comparisons = _ood_comparisons(present, task, items, None, boot, known=known)
    lines += ["", "| comparison | " + " | ".join(COMPARISON_HEADER) + " |", "|---|" + "---|" * 5]
    for label, (plain, _, _) in comparisons.items():
        lines.append(f"| {label} | " + " | ".join(comparison_cells(plain)) + " |")
    between = [(seeds, c.detectable) for label, (c, _, seeds) in comparisons.items() if "base" not in label]
    lines += power_line(between, f"{task} score between methods")
    return lines + _per_run_rows(present, task, items, boot)


def _cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{pct(mean)} ± {pct(sd)}" if len(values) > 1 else pct(mean)


def _ood_comparisons(present: dict, task: str, items: list[str], gold: np.ndarray | None, boot: Bootstrap,
                     wanted: tuple[str, ...] | None = None, known: dict | None = None) -> dict:  # fmt: skip
    """``{label: (accuracy comparison, balanced accuracy comparison or None, seeds)}``: every method against the
    base, then every pair of methods (the later one of METHOD_ORDER first), per setting; only the labels that
    start with one of ``wanted`` if given; those in ``known`` are taken from it, not drawn again."""
    pairs = [(k, ("base", "none")) for k in present if k[0] != "base" and ("base", "none") in present]
    trained = sorted((k for k in present if k[0] != "base"), key=lambda k: (k[1], METHOD_ORDER.index(k[0])))
    pairs += [(b, a) for a, b in combinations(trained, 2) if a[1] == b[1]]
    several = len({k[1] for k in trained}) > 1
    out = {}
    for a_key, b_key in pairs:
        label = f"{NAMES[a_key[0]]} − {NAMES[b_key[0]]}" + (f" ({a_key[1]})" if several else "")
        if wanted is not None and not label.startswith(wanted):
            continue
        if known and label in known:
            out[label] = known[label]
            continue
        a, b = common_seeds(present[a_key], present[b_key])
        if not a:
            continue
        ca, cb = correctness(a, [task], {task: items}), correctness(b, [task], {task: items})
        # a generation task has no answer prior to balance
        balanced = None if gold is None else boot.compare(ca, cb, {task: gold})
        out[label] = (boot.compare(ca, cb), balanced, len(a))
    return out


def _per_run_rows(present: dict, task: str, items: list[str], boot: Bootstrap) -> list[str]:
    base = present.get(("base", "none"))
    if not base:
        return []
    lines = ["", "Each run against the base (one seed each, so the interval is over items only):", ""]
    lines += ["| run | accuracy | vs base | 95% interval, items only |", "|---|---|---|---|"]
    reference = correctness(base, [task], {task: items})
    for key, runs in present.items():
        for r in runs if key[0] != "base" else []:
            c = boot.compare(correctness([r], [task], {task: items}), reference)
            lines.append(f"| {r['run']} | {pct(headline(r['tasks'][task]))} | {points(c.diff)} | {interval(c.items)} |")
    return lines


def ordering_claims(groups: dict, orderings: list, in_domain: list[str], boot: Bootstrap) -> list[Claim]:
    """The paper's orderings of methods on the in-domain average, per setting, as claims."""
    claims = []
    for setting in sorted({k[1] for k in groups if k[1] != "none"}):
        for better, worse, text in orderings:
            if (better, setting) not in groups or (worse, setting) not in groups:
                continue
            a, b = common_seeds(groups[(better, setting)], groups[(worse, setting)])
            items = {t: sorted(i for (task, i) in a[0]["predictions"] if task == t) for t in in_domain}
            paper = paper_difference((better, setting), (worse, setting), in_domain)
            c = boot.compare(correctness(a, in_domain, items), correctness(b, in_domain, items), reference=paper)
            claims.append(Claim(text, setting, f"{NAMES[better]} − {NAMES[worse]}", c, paper=paper, seeds=len(a)))
    return claims


def comparison_rows(claims: list[Claim]) -> list[str]:
    """The in-domain paired comparisons table's rows (one per ordering claim) and its power line."""
    rows = [f"| {c.label} | {c.where} | {c.seeds} | " + " | ".join(comparison_cells(c.comparison)) + " |"
            for c in claims]  # fmt: skip
    return rows + power_line([(c.seeds, c.comparison.detectable) for c in claims], "the in-domain average")


def power_line(detectable: list[tuple[int, float]], what: str) -> list[str]:
    """One sentence: the range of the smallest detectable differences of a table's comparisons."""
    if not detectable:
        return []
    seeds = sorted({n for n, _ in detectable})
    low, high = (100 * f(d for _, d in detectable) for f in (min, max))
    return ["", f"**Power**: with {'/'.join(map(str, seeds))} seeds and these test items, the comparisons above "
            f"detect a true difference in {what} of {low:.1f}-{high:.1f} points or more (80% power, alpha 0.05, "
            "seed-aware); smaller differences are likely to read as within noise."]  # fmt: skip


def against_base(groups: dict, in_domain: list[str], boot: Bootstrap) -> list[str]:
    """Each method's in-domain average against the zero-shot base, seed-aware."""
    base = groups.get(("base", "none"))
    if not base:
        return []
    lines = ["| method | setting | seeds | " + " | ".join(COMPARISON_HEADER) + " |", "|---|---|---|" + "---|" * 5]
    for (method, setting), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], METHOD_ORDER.index(kv[0][0]))):
        if method == "base":
            continue
        items = {t: sorted(i for (task, i) in runs[0]["predictions"] if task == t) for t in in_domain}
        c = boot.compare(correctness(runs, in_domain, items), correctness(base, in_domain, items))
        lines.append(f"| {NAMES[method]} − base | {setting} | {len(runs)} | " + " | ".join(comparison_cells(c)) + " |")
    return lines
