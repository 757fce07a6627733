"""The results page's routing section: does the router send different tasks to different experts?

A task's routing is compared with the all-task mean by the total variation distance of the expert loads
(``task_routing_distances``). An untrained router is no zero point for that distance: its random projection
of each token already separates tasks whose inputs differ. The zero-shot record gives the reference, since the
base model is tested with the protocol config's adapter untrained (its B matrices are zero, so the outputs are
the base model's, while the freshly initialised router routes as an untrained one does).
Specialisation learned in training shows as trained distances above that reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..plots import heatmap_panels
from .claims import NAMES
from .metrics import is_generation


def depth_quartiles(layer_indices: list[int], groups: int = 4) -> dict[int, int]:
    """Layer index -> depth group, contiguous, earlier groups one larger when they do not divide evenly
    (the grouping of ``AdapterConfig.experts_per_layer``)."""
    ordered = sorted(set(layer_indices))
    size, extra = divmod(len(ordered), groups)
    out, start = {}, 0
    for g in range(groups):
        n = size + (1 if g < extra else 0)
        for layer in ordered[start : start + n]:
            out[layer] = g
        start += n
    return out


def routing_top_k(routing: dict) -> int:
    """The top-k of a ``routing.json`` (task -> layer -> statistics): each token's expert loads sum to it."""
    first_task = next(iter(routing.values()))
    return round(sum(next(iter(first_task.values()))["load"]))


def task_routing_distances(routing: dict) -> dict[str, float]:
    """How far each task's expert load is from the all-task mean load (total variation distance of the
    normalised loads, mean over layers): 0 when the router treats every task alike, 1 for disjoint experts.

    Layers with no more experts than top-k are left out: every token takes all of their experts, so their
    load is the same for every task by construction. Tasks get no entry when no layer chooses.
    """
    top_k = routing_top_k(routing)
    tasks = list(routing)
    distances = {}
    for task in tasks:
        per_layer = []
        for name, stats in routing[task].items():
            load = np.asarray(stats["load"])
            if len(load) <= top_k:
                continue
            mean = np.mean([routing[t][name]["load"] for t in tasks], axis=0)
            per_layer.append(0.5 * np.abs(load / load.sum() - mean / mean.sum()).sum())
        if per_layer:
            distances[task] = float(np.mean(per_layer))
    return distances


def routing_figure(record: dict) -> Figure:
    """The task x expert load heat-map of one run, one panel per depth quartile."""
    routing = record["routing"]
    tasks = list(routing)
    layer_of = {name: int(next(p for p in name.split(".") if p.isdigit())) for name in routing[tasks[0]]}
    quartile = depth_quartiles(list(layer_of.values()))
    top_k = routing_top_k(routing)
    panels = []
    for q in range(4):
        names = [n for n, i in layer_of.items() if quartile.get(i) == q]
        if not names:
            continue
        width = max(len(routing[tasks[0]][n]["load"]) for n in names)
        matrix = np.full((len(tasks), width), np.nan)
        for row, task in enumerate(tasks):
            loads = [routing[task][n]["load"] for n in names if len(routing[task][n]["load"]) == width]
            matrix[row] = np.mean(loads, axis=0)
        layers = sorted({layer_of[n] for n in names})
        span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        chosen = ", all chosen" if width <= top_k else ""  # no choice to make: every load is 1
        panels.append((f"{span} ({width} experts{chosen})", matrix, tasks))
    return heatmap_panels(panels, "expert", "share of the task's tokens (top-k)",
                          f"{record['run']}: expert load by task and depth")  # fmt: skip


def _spread(distances: dict[str, float]) -> str:
    low, high = min(distances, key=distances.get), max(distances, key=distances.get)
    return (f"{np.mean(list(distances.values())):.3f} | {distances[low]:.3f} ({low}) | "
            f"{distances[high]:.3f} ({high})")  # fmt: skip


def specialisation_verdict(trained: list[float], untrained: float) -> str:
    """A sentence on the trained runs' mean distances against the untrained router's, with the gaps' size."""
    gaps = [d - untrained for d in trained]
    size = f"by {min(map(abs, gaps)):.3f}-{max(map(abs, gaps)):.3f}"
    if all(g > 0 for g in gaps):
        return (f"above the untrained router's {untrained:.3f} in every seed, {size}: training made the routing "
                "more task-specific than a random router's, by that much")  # fmt: skip
    if all(g < 0 for g in gaps):
        return (f"below the untrained router's {untrained:.3f} in every seed, {size}: training made the routing "
                "*less* task-specific than a random router's, so the router does not specialise by task here")  # fmt: skip
    return f"on both sides of the untrained router's {untrained:.3f} across seeds: no consistent specialisation"


def routing_section(records: list[dict], figures_dir: Path, method: str = "mosld") -> list[str]:
    """The page's routing figure and text for ``method``'s runs, against the zero-shot record's untrained router."""
    routed = sorted((r for r in records if r["method"] == method and r["routing"]), key=lambda r: r["seed"])
    if not routed:
        return []
    routing_figure(routed[0]).savefig(figures_dir / "routing.png", dpi=110, metadata={"Software": None})
    top_k = routing_top_k(routed[0]["routing"])
    distances = task_routing_distances(routed[0]["routing"])
    distance_text = ", ".join(f"{t} {v:.3f}" for t, v in distances.items()) or "none (no layer chooses)"
    lines = [
        f"![routing by task]({figures_dir.name}/routing.png)",
        "",
        f"Expert load by task of `{routed[0]['run']}` on its test items, per depth quartile (mean over the "
        f"quartile's layers and both projections; a row sums to top-k = {top_k}). Where a layer has no more "
        "experts than top-k, every token takes all of them (load 1 by construction; the router only "
        "weighs them). How far each task's routing is from the all-task mean (total variation distance "
        f"of the load distributions, mean over the layers where the router chooses): {distance_text} "
        "(0: the router treats every task alike; 1: disjoint experts).",
    ]
    base = next((r for r in records if r["method"] == "base" and r["routing"]), None)
    # A top-up tests the base in a new process, whose untrained router need not be the first pass's (the
    # initialisation has changed between code versions): the reference keeps the first pass's tasks only, and
    # the trained runs are measured on the same tasks so that the means compare.
    topped_up = [t for part in (base or {}).get("topped_up", []) for t in part["tasks"]]
    same_pass = [t for t in (base["routing"] if base else {}) if t not in topped_up]
    reference = task_routing_distances({t: base["routing"][t] for t in same_pass}) if len(same_pass) > 1 else {}
    tasks = list(reference) or None

    def measured(routing: dict) -> dict[str, float]:
        return task_routing_distances({t: routing[t] for t in tasks if t in routing} if tasks else routing)

    runs = [(r["run"], measured(r["routing"])) for r in routed]
    runs = [(name, d) for name, d in runs if d]
    if not runs:
        return lines
    left_out = (
        f", leaving out {', '.join(topped_up)} (topped up in another pass of the base)"
        if reference and topped_up
        else ""
    )
    lines += ["", f"Task distance from the all-task routing, per run (over the tasks{left_out}: mean, smallest, "
              "largest):", ""]  # fmt: skip
    lines += ["| routing | mean | smallest | largest |", "|---|---|---|---|"]
    if reference:
        lines.append(f"| untrained router (`{base['run']}` record) | {_spread(reference)} |")
    lines += [f"| `{name}` | {_spread(d)} |" for name, d in runs]
    if reference:
        means = [float(np.mean(list(d.values()))) for _, d in runs]
        verdict = specialisation_verdict(means, float(np.mean(list(reference.values()))))
        decoded = ""
        if any(is_generation(m) for m in base["tasks"].values()):
            decoded = " (on generation tasks the loads also count the tokens each model decoded, which differ)"
        lines += [
            "",
            "The zero-shot record is the base model tested with the config's adapter untrained (zero B, so the "
            "outputs are the base model's), its router freshly initialised: a random projection of each token "
            "already separates tasks whose inputs differ, so it, not 0, is the reference (one initialisation)"
            f"{decoded}. The trained {NAMES.get(method, method)} runs' mean distances are {verdict}.",
        ]
    return lines
