"""The single-task setting against the mixture on a results page: per method, the mixture's gain over one
adapter per task (per task and on average), MoSLD against LoRA per task in each setting, and the paper's
claims about them, each beside the paper's own number (Table 1's "s" and "m" rows).

Runs are paired by seed (the single-setting run of seed k with the mixture run of seed k: independent
trainings, so the pairing is arbitrary and costs nothing) and by test item (both settings test each task on
the same seeded sample).
"""

from __future__ import annotations

from .claims import NAMES, Claim, interval, p_text, paper_difference, points
from .comparisons import Runs, common_seeds, correctness
from .stats import Bootstrap, Comparison

SETTINGS = ("mixture", "single")


def shared_items(a: Runs, b: Runs, tasks: list[str]) -> dict[str, list[str]]:
    """Per task, the test items both groups of runs scored (the same seeded sample in every protocol)."""
    have = [{key for r in runs for key in r["predictions"]} for runs in (a, b)]
    return {t: sorted(i for (task, i) in have[0] & have[1] if task == t) for t in tasks}


def _compare(a: Runs, b: Runs, tasks: list[str], items: dict, boot: Bootstrap, paper: float | None) -> Comparison:
    return boot.compare(correctness(a, tasks, items), correctness(b, tasks, items), reference=paper)


def _paper_cell(c: Comparison, paper: float | None) -> str:
    if paper is None:
        return "– | –"
    return f"{points(paper)} | {c.place(paper)}"


def _pairs(groups: dict) -> dict[str, tuple[Runs, Runs]]:
    """Per method with runs in both settings: its (mixture, single) runs of the seeds both have."""
    out = {}
    for method in NAMES:
        if all((method, s) in groups for s in SETTINGS):
            mixture, single = common_seeds(groups[(method, "mixture")], groups[(method, "single")])
            if mixture:
                out[method] = (mixture, single)
    return out


def setting_claims(groups: dict[tuple[str, str], Runs], tasks: list[str], boot: Bootstrap) -> list[Claim]:
    """Per method with both settings, "it gains from the mixture" on the average; and MoSLD's gain against
    LoRA's (the paper's: MoE methods gain from the mixture, LoRA loses)."""
    claims = []
    pairs = _pairs(groups)
    for method, (mixture, single) in pairs.items():
        paper = paper_difference((method, "mixture"), (method, "single"), tasks)
        c = _compare(mixture, single, tasks, shared_items(mixture, single, tasks), boot, paper)
        claims.append(Claim(f"{NAMES[method]} gains from training on the mixture", "mixture vs single",
                            f"{NAMES[method]}: mixture − single", c, paper=paper, seeds=len(mixture)))  # fmt: skip
    if "mosld" in pairs and "lora" in pairs:
        claims.append(_gain_difference(pairs, tasks, boot))
    return claims


def settings_section(groups: dict, tasks: list[str], boot: Bootstrap, claims: list[Claim]) -> list[str]:
    """The "Single task against the mixture" section (empty without both settings); the averages are the
    claims' comparisons."""
    pairs = _pairs(groups)
    if not pairs:
        return []
    lines = ["", "## Single task against the mixture", ""]
    lines += [
        "Per method, the mixture's run against one adapter per task (the single setting), per task and on the "
        "average, in points, with the seed-aware 95% interval and bootstrap p-value as above (runs paired by seed "
        "and item), and the paper's own difference from its Table 1 with where it falls against this interval "
        "(*above* or *below*: excluded at this scale; *inside*: cannot tell). The per-task rows are not corrected "
        "for multiple comparisons; the claims below are.",
        "",
        "| comparison | task | seeds | difference | 95% interval, seeds + items | p | paper | paper's place |",
        "|---|---|---|---|---|---|---|---|",
    ]
    averages = {c.label: c.comparison for c in claims}
    for method, (mixture, single) in pairs.items():
        items = shared_items(mixture, single, tasks)
        label = f"{NAMES[method]}: mixture − single"
        for task in [*tasks, "average"]:
            pick = tasks if task == "average" else [task]
            c = averages.get(label) if task == "average" else None
            paper = paper_difference((method, "mixture"), (method, "single"), pick)
            c = c or _compare(mixture, single, pick, items, boot, paper)
            lines.append(f"| {label} | {task} | {len(mixture)} | {points(c.diff)} | {interval(c.seeds)} | "
                         f"{p_text(c.p)} | {_paper_cell(c, paper)} |")  # fmt: skip
    return lines + _per_task_rows(groups, tasks, boot)


def _gain_difference(pairs: dict, tasks: list[str], boot: Bootstrap) -> Claim:
    """MoSLD's gain from the mixture minus LoRA's (a difference of differences), on the seeds all four share."""
    seeds = set.intersection(*({r["seed"] for r in runs} for m in ("mosld", "lora") for runs in pairs[m]))
    arrays = {}
    for method in ("mosld", "lora"):
        mixture, single = ([r for r in runs if r["seed"] in seeds] for runs in pairs[method])
        items = shared_items(mixture, single, tasks)
        ca, cb = correctness(mixture, tasks, items), correctness(single, tasks, items)
        arrays[method] = {t: ca[t] - cb[t] for t in tasks}
    paper = None
    parts = [paper_difference((m, "mixture"), (m, "single"), tasks) for m in ("mosld", "lora")]
    if None not in parts:
        paper = parts[0] - parts[1]
    c = boot.compare(arrays["mosld"], arrays["lora"], reference=paper)
    return Claim("MoSLD gains more from the mixture than LoRA", "mixture vs single",
                 "(MoSLD mixture − single) − (LoRA mixture − single)", c, paper=paper, seeds=len(seeds))  # fmt: skip


def _per_task_rows(groups: dict, tasks: list[str], boot: Bootstrap) -> list[str]:
    """MoSLD − LoRA per task in each setting, beside the paper's per-task difference."""
    lines = []
    for setting in SETTINGS:
        if ("mosld", setting) not in groups or ("lora", setting) not in groups:
            continue
        a, b = common_seeds(groups[("mosld", setting)], groups[("lora", setting)])
        items = shared_items(a, b, tasks)
        for task in tasks:
            paper = paper_difference(("mosld", setting), ("lora", setting), [task])
            c = _compare(a, b, [task], items, boot, paper)
            lines.append(f"| MoSLD − LoRA ({setting}) | {task} | {len(a)} | {points(c.diff)} | {interval(c.seeds)} | "
                         f"{p_text(c.p)} | {_paper_cell(c, paper)} |")  # fmt: skip
    return lines
