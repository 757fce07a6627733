"""Two runs compared item by item: ``python -m mosld.experiments compare RUN_A RUN_B [--stage val|test]``.

Reads each run folder's ``<stage>_predictions.jsonl`` (written by ``ItemPredictionWriter``: one row per
scored item with its task, stable item id and correctness) and reports, per task and for the macro
average, the accuracy of both runs, their difference with a paired bootstrap interval over the items
both runs scored, and the exact McNemar test. One seed per run: the interval covers which items were
drawn, not seed-to-seed variation (the sweep's results page has the seed-aware one).

A generation task's items carry a score in [0, 1] (exact match: 0/1; token F1, ROUGE-L: fractions): its
"accuracy" is the mean score. McNemar's test needs 0/1 results, so where some score is a fraction only the
paired bootstrap is given (and the output says so).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..evaluation.sums import MC_SCORINGS
from .metrics import is_binary, item_score
from .stats import mcnemar_exact, paired_bootstrap

# A prediction row's per-item keys: ``correct`` (the headline scoring) and each scoring's own key.
SCORINGS = ("correct", *(s.key for s in MC_SCORINGS))


def read_predictions(run: Path, stage: str) -> dict[tuple[str, str], dict]:
    """``{(task, item): row}`` from ``<run>/<stage>_predictions.jsonl``, with errors naming the file and line."""
    path = Path(run) / f"{stage}_predictions.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the run did not record its {stage} items (ItemPredictionWriter stages)")
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows[(str(row["task"]), str(row["item"]))] = row
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a prediction row with task and item ({err})") from err
    return rows


def item_value(row: dict, scoring: str, where: str) -> float:
    """An item's result under ``scoring``: ``correct`` reads a generation row's score."""
    if scoring == "correct":
        return item_score(row)
    if scoring not in row:
        raise ValueError(f"{where}: task {row['task']!r} has no {scoring!r} (a generation task: use scoring correct)")
    return float(row[scoring])


def compare_runs(a: Path, b: Path, stage: str = "val", scoring: str = "correct", resamples: int = 2000) -> dict:
    """Per task and macro average: accuracy (generation: mean score) of ``a`` and ``b`` (%), ``a - b`` with its
    95% paired interval over the shared items, and McNemar's discordant counts and p-value (``None`` where some
    score is a fraction: the bootstrap only)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    rows_a, rows_b = read_predictions(a, stage), read_predictions(b, stage)
    shared = sorted(set(rows_a) & set(rows_b))
    if not shared:
        raise ValueError(f"{a} and {b} scored no item in common in {stage}")
    tasks = sorted({task for task, _ in shared})
    arrays = {}
    for side, rows in (("a", rows_a), ("b", rows_b)):
        arrays[side] = {
            t: np.array([[item_value(rows[key], scoring, f"{side} ({stage})") for key in shared if key[0] == t]])
            for t in tasks
        }  # (1 seed, items)
    result = {"stage": stage, "scoring": scoring, "items": len(shared),
              "only_a": len(set(rows_a) - set(rows_b)), "only_b": len(set(rows_b) - set(rows_a)), "tasks": {}}  # fmt: skip
    for task in [*tasks, "average"]:
        pick = tasks if task == "average" else [task]
        sub_a, sub_b = ({t: arrays[s][t] for t in pick} for s in ("a", "b"))
        diff, low, high = paired_bootstrap(sub_a, sub_b, resamples=resamples)
        binary = is_binary([*sub_a.values(), *sub_b.values()])
        n_ab, n_ba, p = mcnemar_exact(sub_a, sub_b) if binary else (None, None, None)
        result["tasks"][task] = {
            "items": int(sum(sub_a[t].shape[1] for t in pick)),
            "acc_a": 100 * float(np.mean([sub_a[t].mean() for t in pick])),
            "acc_b": 100 * float(np.mean([sub_b[t].mean() for t in pick])),
            "diff": 100 * diff, "low": 100 * low, "high": 100 * high,
            "a_only_right": n_ab, "b_only_right": n_ba, "mcnemar_p": p,
        }  # fmt: skip
    return result


def format_comparison(result: dict, name_a: str, name_b: str) -> str:
    lines = [
        f"{result['stage']} items scored by both: {result['items']} (scoring {result['scoring']}; "
        f"only in A: {result['only_a']}, only in B: {result['only_b']})",
        f"A = {name_a}",
        f"B = {name_b}",
        "",
        "| task | items | A % | B % | A - B (95% paired interval) | A right only | B right only | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fractional = []
    for task, r in result["tasks"].items():
        if r["mcnemar_p"] is None:
            fractional.append(task)
            mcnemar = "– | – | –"
        else:
            mcnemar = f"{r['a_only_right']} | {r['b_only_right']} | {r['mcnemar_p']:.3f}"
        lines.append(
            f"| {task} | {r['items']} | {r['acc_a']:.1f} | {r['acc_b']:.1f} | {r['diff']:+.1f} "
            f"[{r['low']:+.1f}, {r['high']:+.1f}] | {mcnemar} |"
        )
    if fractional:
        lines += ["", f"{', '.join(fractional)}: scores are fractions (generation metric), not 0/1: the paired "
                  "bootstrap only, no McNemar test; A % and B % are mean scores."]  # fmt: skip
    return "\n".join(lines)
