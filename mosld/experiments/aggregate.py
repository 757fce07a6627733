"""Turn a protocol's run records into a results page: a Table-1-shaped table (mean ± s.d. over seeds),
paired comparisons with bootstrap intervals and exact McNemar p-values, plain sentences on the paper's
orderings, and figures (accuracy per task, training loss curves, task x expert routing heat-map).

Everything is computed from the records alone (``experiments/results/<protocol>/``, and those of the protocols
it is compared with), with a fixed bootstrap seed, so running it again on the same records writes the same
page; verdicts do not hang on that seed (``stats.Comparison.verdict``: an interval end whose Monte Carlo band
holds 0 makes a claim *borderline*).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .claims import METHOD_ORDER, NAMES, PAPER_ORDERINGS, Claim, adjust, paper_averages, sentence
from .comparisons import (
    COMPARISON_HEADER,
    INTERVALS_NOTE,
    against_base,
    comparison_rows,
    ood_claims,
    ood_section,
    ordering_claims,
)
from .metrics import headline, headline_metric, is_generation, item_score
from .routing import routing_section
from .settings import setting_claims, settings_section
from .stats import ESCALATED, MC_LEVEL, RESAMPLES, Bootstrap, mean_sd


def borrowed_records(results_dir: Path, methods: list[str], tasks: list[str]) -> list[dict]:
    """The trained runs of another protocol (``compare_with``) for this page: ``methods``' records only, with
    their results on ``tasks`` only (this page's in-domain tasks)."""
    records = [r for r in load_records(results_dir) if r["method"] in methods]
    for r in records:
        r["tasks"] = {t: v for t, v in r["tasks"].items() if t in tasks}
        r["predictions"] = {key: v for key, v in r["predictions"].items() if key[0] in tasks}
        r["answers"] = {key: v for key, v in r["answers"].items() if key[0] in tasks}
        r["in_domain"] = [t for t in r["in_domain"] if t in tasks]
        r["out_of_domain"] = []
        r["borrowed"] = str(results_dir)
    return records


def load_records(results_dir: Path) -> list[dict]:
    """Every finished run's metrics and predictions under ``results_dir`` (folders with a metrics.json)."""
    records = []
    for metrics_path in sorted(results_dir.glob("*/metrics.json")):
        record = json.loads(metrics_path.read_text())
        rows = [json.loads(line) for line in (metrics_path.parent / "predictions.jsonl").read_text().splitlines()]
        record["predictions"] = {(r["task"], r["item"]): item_score(r) for r in rows}  # 0/1, or a generation score
        record["answers"] = {(r["task"], r["item"]): (int(r["pred"]), int(r["gold"])) for r in rows if "pred" in r}
        routing = metrics_path.parent / "routing.json"
        record["routing"] = json.loads(routing.read_text()) if routing.is_file() else None
        records.append(record)
    return records


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ood_cell(values: list[float], runs: int) -> str:
    """Mean ± s.d. over the runs that have the task; says how many when some lack it."""
    if not values:
        return "–"
    return _mean_sd_cell(values) + (f" ({len(values)} of {runs})" if len(values) < runs else "")


def _mean_sd_cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{_pct(mean)} ± {_pct(sd)}" if len(values) > 1 else _pct(mean)


@dataclass
class Page:
    """What a results page is drawn from: the protocol's own records, those it is compared with, the records
    grouped by (method, setting), the group order, the in-domain and the out-of-domain tasks."""

    protocol: str
    own: list[dict]
    records: list[dict]
    groups: dict[tuple[str, str], list[dict]]
    keys: list[tuple[str, str]]
    in_domain: list[str]
    ood: list[str]


def load_page(results_dir: Path, test_tasks: list[str] | None = None, compare_with: list[Path] | None = None) -> Page:
    """The records of a protocol (and of the protocols it is compared with) as a page sees them."""
    records = load_records(results_dir)
    if not records:
        raise ValueError(f"aggregate: no finished run records (metrics.json) under {results_dir}")
    own = list(records)
    if compare_with:
        methods = sorted({r["method"] for r in records if r["method"] != "base"})
        tasks = next((r["in_domain"] for r in records if r["method"] != "base"), None) or list(records[0]["tasks"])
        for folder in compare_with:
            records += borrowed_records(Path(folder), methods, tasks)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["setting"])].append(r)
    for runs in groups.values():
        runs.sort(key=lambda r: r["seed"])
    keys = sorted(groups, key=lambda k: (k[1] != "none", k[1], METHOD_ORDER.index(k[0])))
    trained = [r for r in records if r["method"] != "base"]
    in_domain = trained[0]["in_domain"] if trained else records[0]["in_domain"] or list(records[0]["tasks"])
    recorded_ood = {t for r in records for t in r["out_of_domain"]}
    ood = [t for t in test_tasks or [] if t not in in_domain]
    ood += sorted(recorded_ood - set(in_domain) - set(ood))
    return Page(records[0]["protocol"], own, records, dict(groups), keys, in_domain, ood)


def page_claims(page: Page, boot: Bootstrap) -> list[Claim]:
    """The paper's claims a page tests, drawn with ``boot`` and adjusted together (Holm, one family): the
    orderings of methods in each setting, single against mixture, and the out-of-domain claims. The page
    states exactly these verdicts."""
    claims = ordering_claims(page.groups, PAPER_ORDERINGS, page.in_domain, boot)
    claims += setting_claims(page.groups, page.in_domain, boot)
    claims += ood_claims(page.groups, page.keys, page.ood, boot)
    adjust(claims)
    return claims


def aggregate(
    results_dir: Path,
    out_md: Path,
    figures_dir: Path | None = None,
    resamples: int = RESAMPLES,
    expected_runs: list[str] | None = None,
    test_tasks: list[str] | None = None,
    compare_with: list[Path] | None = None,
) -> str:
    """Write the results page for the records in ``results_dir`` and return its text.

    Args:
        results_dir: A protocol's records (``experiments/results/<protocol>``).
        out_md: The markdown page to write.
        figures_dir: Where the PNG figures go; default ``<out_md's folder>/results_<protocol>``.
        resamples: Bootstrap resamples of a comparison (more where a verdict is borderline).
        expected_runs: The protocol's run names; the page then says which have no record yet.
        test_tasks: The names of the protocol's test tasks; those not trained on are out-of-domain, and the page
            says which records lack them.
        compare_with: Other protocols' results folders whose trained runs of this protocol's methods go on the
            page beside its own, on its in-domain tasks (the mixture runs beside a single-task protocol's).
    """
    page = load_page(results_dir, test_tasks, compare_with)
    protocol, own, records, groups, keys = page.protocol, page.own, page.records, page.groups, page.keys
    in_domain, ood = page.in_domain, page.ood
    trained = [r for r in records if r["method"] != "base"]
    boot = Bootstrap(resamples)
    figures_dir = figures_dir or out_md.parent / f"results_{protocol}"
    figures_dir.mkdir(parents=True, exist_ok=True)

    borrowed = sorted({r["borrowed"] for r in records if "borrowed" in r})
    lines = [f"# Results: protocol `{protocol}`", ""]
    lines += [
        f"Generated by `python -m mosld.experiments aggregate` from the run records ({len(own)}) in "
        f"`{results_dir}`"
        + (
            f" and the {len(records) - len(own)} runs of its methods in `{'`, `'.join(borrowed)}` (on this page's "
            "tasks only)"
            if borrowed
            else ""
        )  # fmt: skip
        + " (do not edit by hand). "
        + scores_note(records)
        + "; mean ± s.d. over seeds; the "
        "average is over the in-domain tasks"
        + (f"; {', '.join(ood)}: out-of-domain (never trained on). " if ood else ". ")
        + "Every method of a seed saw the same training batches and was tested on the same items"
        + (" (within a setting; the settings share the test items)." if borrowed else ".")
        + generation_note(records),
        "",
    ]
    if expected_runs is not None:
        missing = [name for name in expected_runs if name not in {r["run"] for r in records}]
        lines += [
            f"**{len(expected_runs) - len(missing)} of {len(expected_runs)} runs of the protocol are recorded**"
            + (f"; not yet run: {', '.join(missing)}." if missing else "."),
            "",
        ]
    # ---- the table
    lines += results_table(groups, keys, in_domain, ood)
    items_per_task = {t: int(r["tasks"][t]["items"]) for r in reversed(records) for t in r["tasks"]}
    items_per_task = {t: items_per_task[t] for t in [*in_domain, *ood] if t in items_per_task}
    lines += ["", "Test items per task: " + ", ".join(f"{t} {n}" for t, n in items_per_task.items()) + ".", ""]
    lines += _other_scorings(groups, keys, in_domain)
    # ---- training cost
    if trained:
        lines += ["", "Training (mean over runs): steps, real tokens seen, padding of the batches, wall time of "
                  "the training steps, tokens/s, final training loss (mean of the last 10% of steps). Wall time and "
                  "tokens/s are as measured on the machine at the time (torch threads in each record's `machine`; "
                  "runs may have shared the CPU with other jobs), so they compare methods only roughly: the "
                  "step-time ratios measured side by side are in docs/benchmarks.md.", ""]  # fmt: skip
        lines += [
            "| method | setting | steps | tokens | padding | train s | tokens/s | final loss |",
            "|---|---|" + "---|" * 6,
        ]
        for key in keys:
            runs = [r for r in groups[key] if "steps" in r]
            if not runs:
                continue
            mean = {k: float(np.mean([r[k] for r in runs])) for k in
                    ("steps", "tokens_seen", "padding_fraction", "train_seconds", "train_tokens_per_second", "final_train_loss")}  # fmt: skip
            lines.append(
                f"| {NAMES.get(key[0], key[0])} | {key[1]} | {mean['steps']:.0f} | {mean['tokens_seen']:,.0f} | "
                f"{100 * mean['padding_fraction']:.1f}% | {mean['train_seconds']:.0f} | "
                f"{mean['train_tokens_per_second']:.0f} | {mean['final_train_loss']:.3f} |"
            )
    lines += precision_note(trained)
    # ---- paired comparisons
    lines += ["", "## Paired comparisons", ""]
    lines += [
        f"Difference of the average accuracy (points) over the in-domain tasks, with 95% intervals ({resamples:,} "
        "bootstrap resamples; more where a verdict is borderline), the smallest difference the comparison can "
        "detect (80% power, alpha 0.05), and the bootstrap p-value of no difference. Only seeds both methods "
        "have are used.",
        "",
        INTERVALS_NOTE,
        "",
        "| comparison | setting | seeds | " + " | ".join(COMPARISON_HEADER) + " |",
        "|---|---|---|" + "---|" * 5,
    ]
    claims = page_claims(page, boot)
    in_domain_claims = [c for c in claims if c.where not in ood]
    lines += comparison_rows([c for c in in_domain_claims if c.where != "mixture vs single"])
    lines += settings_section(groups, in_domain, boot, claims)
    lines += ["", "## What the paper claims, and what holds here", ""]
    lines += [sentence(c) for c in in_domain_claims] or [
        "- No pair of methods of the paper's orderings has records yet."
    ]
    settings = sorted({k[1] for k in keys if k[1] != "none"})
    lines += [
        "",
        '"Holds" and "is reversed" mean the 95% interval over seeds and items excludes zero; "within noise" means '
        'it does not; "borderline" means that an end of the interval is so close to zero that the bootstrap\'s own '
        f"randomness could move it across (its {MC_LEVEL:.0%} Monte Carlo band holds zero, even after "
        f"{ESCALATED:,} resamples). "
        "Holm's step-down adjustment of the bootstrap p-values over all the claims on this page (a family-wise "
        "error of 5%) gives the second verdict. The paper's own difference is set against each interval: "
        "outside it, this scale excludes the paper's effect; inside, it cannot tell. For reference, the paper's "
        "averages (LLaMA-2-7B, 10 epochs, mean of 3 runs) are "
        + "; ".join(f"{s}: {paper_averages(s)}" for s in settings)
        + "; a 135M-parameter model trained for minutes on a CPU is a different regime, so the question here "
        "is only whether the orderings survive at this scale."
        + (" The out-of-domain claims are in the next section." if ood else ""),
    ]
    base = groups.get(("base", "none"))
    if base and trained:
        base_avg = np.mean([headline(base[0]["tasks"][t]) for t in in_domain])
        lines += ["", f"Each method against the zero-shot base ({_pct(base_avg)} average on the same items):", ""]
        lines += against_base(groups, in_domain, boot)
        lines += ["", "Every run against the base (average, points):", ""]
        lines += ["| run | average | vs base |", "|---|---|---|"]
        for r in sorted(trained, key=lambda r: (r["setting"], METHOD_ORDER.index(r["method"]), r["seed"])):
            avg = np.mean([headline(r["tasks"][t]) for t in in_domain])
            lines.append(f"| {r['run']} | {_pct(avg)} | {100 * (avg - base_avg):+.1f} |")
    if ood:
        lines += ood_section(groups, keys, ood, boot, claims)
        lines += ["", "### What the paper claims out of domain, and what holds here", ""]
        lines += [sentence(c) for c in claims if c.where in ood] or [
            "- No out-of-domain task has records of both MoSLD and LoRA yet."
        ]
    # ---- figures
    lines += ["", "## Figures", ""]
    tested = [t for t in in_domain + ood if any(t in r["tasks"] for r in records)]
    _accuracy_figure(groups, keys, tested).savefig(figures_dir / "accuracy.png", dpi=110, metadata={"Software": None})
    lines += [f"![accuracy per task]({figures_dir.name}/accuracy.png)", ""]
    if trained:
        _loss_figure(groups, keys).savefig(figures_dir / "train_loss.png", dpi=110, metadata={"Software": None})
        lines += [f"![training loss]({figures_dir.name}/train_loss.png)", ""]
    lines += routing_section(
        [r for r in own if r["setting"] != "single"], figures_dir
    )  # one model per task: no routing
    text = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    return text


# A results table with more task columns than this is split: averages by method, then tasks as rows.
MAX_TASK_COLUMNS = 10


def results_table(groups: dict, keys: list, in_domain: list[str], ood: list[str]) -> list[str]:
    """Mean ± s.d. over seeds per method, task and average: one table, or, with many tasks, an averages table
    and a task x method table (20 bAbI columns do not read)."""

    def cell(runs: list[dict], task: str) -> str:
        if task in ood:
            return _ood_cell([headline(r["tasks"][task]) for r in runs if task in r["tasks"]], len(runs))
        return _mean_sd_cell([headline(r["tasks"][task]) for r in runs]) if task in runs[0]["tasks"] else "–"

    split = len(in_domain) + len(ood) > MAX_TASK_COLUMNS
    columns = [] if split else in_domain
    header = ["method", "setting", "seeds", "trainable params", *columns, "avg", *ood]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        runs = groups[key]
        method, setting = key
        params = runs[0].get("trainable_parameters")
        cells = [NAMES.get(method, method), setting, str(len(runs)), f"{params:,}" if params else "0"]
        cells += [cell(runs, t) for t in columns]
        averages = [np.mean([headline(r["tasks"][t]) for t in in_domain]) for r in runs]
        cells.append(f"**{_mean_sd_cell(averages)}**")
        cells += [cell(runs, t) for t in ood]
        lines.append("| " + " | ".join(cells) + " |")
    if split:
        names = [NAMES.get(m, m) + ("" if s == "none" else f" ({s})") for m, s in keys]
        lines += ["", "Per task (mean ± s.d. over seeds):", ""]
        lines += ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {t} | " + " | ".join(cell(groups[k], t) for k in keys) + " |" for t in in_domain]
    return lines


def all_generation(records: list[dict]) -> bool:
    """Whether every task of every record is a generation task (no multiple choice on the page)."""
    return all(is_generation(m) for r in records for m in r["tasks"].values())


def precision_note(records: list[dict]) -> list[str]:
    """Which runs trained and tested in which precision, on pages where some record says (records keep it since
    `auto` made it depend on the machine); a run without it is described by its machine's bf16 support."""
    if not any("precision" in r for r in records):
        return []
    cpu = {True: " (a CPU with native bf16)", False: " (a CPU without native bf16)"}
    runs: dict[str, list[str]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r["setting"], r["method"], r["seed"])):
        unknown = "not recorded" + cpu.get(r.get("machine", {}).get("cpu_native_bf16"), "")
        runs[r.get("precision", unknown)].append(r["run"])
    return ["", "Precision of the fits and tests (`trainer.precision`; `auto` chooses it from the machine, so the "
            "runs of one protocol can differ): " + "; ".join(f"{p}: {', '.join(names)}" for p, names in
                                                          sorted(runs.items())) + "."]  # fmt: skip


def scores_note(records: list[dict]) -> str:
    """What the page's numbers are: multiple-choice accuracy, generation metrics, or both."""
    if all_generation(records):
        return "Scores in %: each task's metric on the greedy continuation"
    return "Accuracy in %, headline scoring (log-likelihood per character of each choice)"


def generation_metrics(records: list[dict]) -> dict[str, str]:
    """Task -> headline metric of the generation tasks of the records, in the order first met."""
    out: dict[str, str] = {}
    for r in records:
        for task, metrics in r["tasks"].items():
            if task not in out and is_generation(metrics):
                out[task] = headline_metric(metrics)
    return out


def generation_note(records: list[dict]) -> str:
    """The page's sentence on generation tasks (empty when every task is multiple choice)."""
    metrics = generation_metrics(records)
    if not metrics:
        return ""
    by_metric: dict[str, list[str]] = defaultdict(list)
    for task, metric in metrics.items():
        by_metric[metric].append(task)
    common = max(by_metric, key=lambda m: len(by_metric[m]))
    separator = ", "
    if len(by_metric[common]) <= 2:
        parts = [f"{t}: {m}" for t, m in metrics.items()]
    else:  # many tasks: name the metric most of them share once
        parts = [f"{m}: {', '.join(tasks)}" for m, tasks in by_metric.items() if m != common]
        parts.append(f"{common}: " + ("every task" if len(by_metric) == 1 else f"the other {len(by_metric[common])}"))
        separator = "; "
    return (
        " Generation tasks are scored on the greedy continuation"
        + ("" if all_generation(records) else " instead")
        + ", their cells being the task's metric in % ("
        + separator.join(parts)
        + "); averages are over every "
        "task's headline (accuracy or metric), and paired statistics take each item's score (0/1 for multiple "
        "choice and exact match, a fraction for F1 or ROUGE-L)."
    )


def _other_scorings(groups: dict, keys: list, in_domain: list[str]) -> list[str]:
    """The average under the other two multiple-choice scorings, over the multiple-choice in-domain tasks."""
    other = [("sum of log-likelihoods", "acc_sum"), ("log-likelihood per token", "acc_token_norm")]
    mc = [t for t in in_domain if all("acc" in r["tasks"].get(t, {"acc": 0}) for k in keys for r in groups[k])]
    if not mc:
        return []
    only = "" if len(mc) == len(in_domain) else ", over the multiple-choice tasks only"
    lines = [f"Average accuracy under the other two scorings (mean over seeds{only}):", ""]
    lines += ["| method | setting | " + " | ".join(n for n, _ in other) + " |", "|---|---|" + "---|" * len(other)]
    for key in keys:
        runs = groups[key]
        cells = [_pct(np.mean([np.mean([r["tasks"][t][s] for t in mc]) for r in runs])) for _, s in other]
        lines.append(f"| {NAMES.get(key[0], key[0])} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def _accuracy_figure(groups: dict, keys: list, tasks: list[str]) -> Figure:
    fig = Figure(figsize=(max(6.0, 1.3 * len(tasks) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        runs = groups[key]
        values = [[headline(r["tasks"][t]) for r in runs if t in r["tasks"]] for t in tasks]
        stats = [mean_sd(v) if v else (np.nan, 0.0) for v in values]
        x = np.arange(len(tasks)) + (j - (len(keys) - 1) / 2) * width
        ax.bar(x, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats], capsize=2,
               label=f"{NAMES.get(key[0], key[0])} ({key[1]})" if key[1] != "none" else NAMES["base"])  # fmt: skip
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20)
    generation = any(is_generation(r["tasks"][t]) for k in keys for r in groups[k] for t in tasks if t in r["tasks"])
    ax.set_ylabel(("accuracy or metric" if generation else "accuracy") + " (%), mean ± s.d. over seeds")
    ax.legend(fontsize=7, ncols=2)
    return fig


def _loss_figure(groups: dict, keys: list) -> Figure:
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for key in keys:
        curves = [r["train_loss_curve"] for r in groups[key] if r.get("train_loss_curve")]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        steps = [s for s, _ in curves[0][:length]]
        mean = np.mean([[v for _, v in c[:length]] for c in curves], axis=0)
        window = max(1, length // 20)
        smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, label=f"{NAMES.get(key[0], key[0])} ({key[1]}, {len(curves)} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss (moving mean)")
    ax.legend(fontsize=7)
    return fig
