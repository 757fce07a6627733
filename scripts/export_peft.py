"""Export a finished run's mixture as standard peft LoRA adapters: one per task and one for the mixture.

Each task's gates are the router's mean top-k gates over a fixed seeded sample of that task's training
items (``mosld.mean_gates``); the mixture's are the mean of the tasks' gates (every task weighs the same).
With those gates held fixed the mixture is exactly a plain LoRA (docs/serving.md), written with
``mosld.export_peft`` into ``<out>/<task>/`` and ``<out>/mixture/``; ``<out>/gates.json`` records the
gates, the sample and how concentrated the gates are.

Examples:
    python scripts/export_peft.py lightning_logs/version_0                 # -> lightning_logs/version_0/peft
    python scripts/export_peft.py lightning_logs/version_0 --verify        # + logits of peft == mosld (needs peft)
    python scripts/export_peft.py lightning_logs/version_0 --eval-limit 300   # + accuracy: routed vs fixed gates
    python scripts/export_peft.py RUN --gates RUN/peft/gates.json --eval-limit 300 --fixed-gates mixture --out RUN/acc
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from mosld.adapters import load_adapter, mean_gates, set_static_gates
from mosld.adapters.export import export_peft, read_export_gates
from mosld.adapters.static import average_gates, normalised_entropy
from mosld.data.datamodule import MultiTaskDataModule, TrainCollator
from mosld.data.tasks import seeded_sample
from mosld.evaluation import evaluate
from mosld.experiments.stats import compare
from mosld.models import is_embedded, load_base_model, resolve_model_path

GATE_SAMPLE_SEED = 0  # the gate sample is the same whatever the run's seed
MIXTURE = "mixture"
FIXED_GATES = ("task", "mixture")  # the kinds of fixed gates --eval-limit scores against routing


def _init_args(section: object, name: str, file: Path) -> dict:
    """A config section's arguments, whether written flat or as ``class_path`` + ``init_args``."""
    if not isinstance(section, dict):
        raise ValueError(f"{file}: section {name!r} is missing or not a mapping")
    return dict(section.get("init_args", section)) if "class_path" in section else dict(section)


def read_run(run: Path) -> tuple[dict, dict]:
    """The ``model`` and ``data`` sections of a run folder's ``config.yaml``; checks the adapter is there."""
    config_file, adapter = run / "config.yaml", run / "adapter" / "adapter_config.json"
    for path in (config_file, adapter):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; expected a finished run folder (lightning_logs/version_N with config.yaml and "
                "the adapter/ that fit writes at its end)"
            )
    config = yaml.safe_load(config_file.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a mapping with 'model' and 'data' sections")
    return _init_args(config.get("model"), "model", config_file), _init_args(config.get("data"), "data", config_file)


def build_data(model_args: dict, data_args: dict, data_dir: str | None) -> MultiTaskDataModule:
    """The run's data module (its tasks, templates, lengths), without any training-time state."""
    known = set(inspect.signature(MultiTaskDataModule.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in data_args.items() if k in known}
    kwargs["model_name_or_path"] = model_args["model_name_or_path"]
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    return MultiTaskDataModule(**kwargs)


def gate_batches(data: MultiTaskDataModule, task_id: int, items: int, batch_size: int) -> list[dict]:
    """Training sequences (prompt + gold answer) of a fixed sample of one task, longest first."""
    sample = seeded_sample(data.encoded(task_id, "train"), items, GATE_SAMPLE_SEED)
    eos, collate = data.tokenizer.eos_token_id, TrainCollator(data.tokenizer.pad_token_id)
    rows = sorted((item.train_sequence(eos) + (task_id,) for item in sample), key=lambda row: -len(row[0]))
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def verify(model: torch.nn.Module, base_name: str, folder: Path, gates: dict, batch: dict) -> dict[str, float]:
    """Max |logit difference| over real tokens: peft on a fresh base, and peft merged, vs mosld with fixed gates.

    Also the difference between peft's merged and unmerged model, the float32 rounding floor of the model.
    """
    import peft  # only for this check; mosld's export does not need it

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        set_static_gates(model, gates)
        try:
            reference = model(**inputs).logits[real]
        finally:
            set_static_gates(model, None)
        loaded = peft.PeftModel.from_pretrained(load_base_model(base_name, dtype="float32"), str(folder)).eval()
        got = loaded(**inputs).logits[real]
        merged = loaded.merge_and_unload()(**inputs).logits[real]
    return {
        "peft": (got - reference).abs().max().item(),
        "merged": (merged - reference).abs().max().item(),
        "peft_merged_vs_unmerged": (merged - got).abs().max().item(),  # float32 rounding between peft's own two
        "max_abs_logit": reference.abs().max().item(),
    }


def accuracy_table(rows: list[dict], mixture_entropy: float) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| task | items | routed | per-task gates | mixture gates | gate entropy (task) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["routed"], row["task_gates"], row["mixture_gates"], row["entropy"]]
        lines.append(f"| {row['task']} | {row['items']} | " + " | ".join(cell(c) for c in cells) + " |")
    macro = []
    for key in ("routed", "task_gates", "mixture_gates"):
        values = [row[key] for row in rows if row[key] is not None]
        macro.append(f"**{sum(values) / len(values):.3f}**" if len(values) == len(rows) else "-")
    lines.append(f"| **macro average** | | {' | '.join(macro)} | {mixture_entropy:.3f} (mixture) |")
    return "\n".join(lines)


def measure(
    model,
    data: MultiTaskDataModule,
    gates: dict[str, dict],
    limit: int,
    data_dir: str | None,
    generation: dict | None,
    fixed: Sequence[str] = FIXED_GATES,
) -> tuple[list[dict], dict[str, dict]]:
    """Test accuracy per task: routed, and with each kind of fixed gates in ``fixed`` (``mixture``: the mixture's
    for every task; ``task``: each task's own); and the paired comparisons of routed against each (``paired``)."""
    common = {
        "split": "test",
        "data_dir": data.data_dir if data_dir is None else data_dir,
        "limit": limit,
        "batch_size": data.eval_batch_size,
        "max_length": data.max_length,
        "templates": dict(zip(data.task_names, data.templates, strict=True)),
        "generation": generation,
        "verbose": True,
        "item_scores": True,
    }
    results, items, scores = {}, {}, {}
    settings = [("routed", None)] + ([("mixture_gates", gates[MIXTURE])] if "mixture" in fixed else [])
    for setting, setting_gates in settings:
        started = time.perf_counter()
        set_static_gates(model, setting_gates)
        result = evaluate(model, data.tokenizer, data.tasks, **common)
        results[setting] = result["accuracy"]
        scores[setting] = result["item_scores"]
        items = {name: metrics["num_items"] for name, metrics in result["metrics"].items()}
        print(f"[{setting}: {time.perf_counter() - started:.0f} s]", flush=True)
    results.setdefault("mixture_gates", {})
    results["task_gates"], scores["task_gates"] = {}, {}
    started = time.perf_counter()
    for task, name in zip(data.tasks, data.task_names, strict=True):
        if name in gates and "task" in fixed:
            set_static_gates(model, gates[name])
            one = {**common, "templates": {name: common["templates"][name]},  # the options of this task alone
                   "generation": {name: generation[name]} if name in (generation or {}) else None}  # fmt: skip
            result = evaluate(model, data.tokenizer, [task], **one)
            results["task_gates"].update(result["accuracy"])
            scores["task_gates"].update(result["item_scores"])
    if "task" in fixed:
        print(f"[task_gates: {time.perf_counter() - started:.0f} s]", flush=True)
    set_static_gates(model, None)
    rows = [
        {
            "task": name,
            "items": items[name],
            "routed": results["routed"][name],
            "task_gates": results["task_gates"].get(name),
            "mixture_gates": results["mixture_gates"].get(name),
            "entropy": normalised_entropy(gates[name]) if name in gates else None,
        }
        for name in data.task_names
    ]
    return rows, {
        kind: paired(scores["routed"], scores[kind]) for kind in ("task_gates", "mixture_gates") if scores.get(kind)
    }


def paired(routed: dict[str, list[float]], fixed: dict[str, list[float]]) -> dict:
    """Routed minus fixed gates in macro-average accuracy over the tasks both have, item by item: the difference
    in points, its 95% bootstrap interval over the items, the bootstrap p-value and the verdict
    (``mosld.experiments.stats.compare``, as the results pages draw theirs)."""
    tasks = [t for t in routed if t in fixed]
    a, b = ({t: np.asarray([x[t]], dtype=float) for t in tasks} for x in (routed, fixed))
    result = compare(a, b)
    return {"tasks": len(tasks), "items": sum(len(routed[t]) for t in tasks), "diff": 100 * result.diff,
            "low": 100 * result.seeds[0], "high": 100 * result.seeds[1], "p": result.p, "verdict": result.verdict(),
            "resamples": result.resamples}  # fmt: skip


def paired_lines(comparisons: dict[str, dict]) -> str:
    names = {"task_gates": "per-task gates", "mixture_gates": "mixture gates"}
    return "\n".join(
        f"routed - {names[k]}: {c['diff']:+.2f} points [{c['low']:+.2f}, {c['high']:+.2f}] (95%, paired over "
        f"{c['items']} items of {c['tasks']} tasks), bootstrap p = {c['p']:.3f}: the difference {c['verdict']}"
        for k, c in comparisons.items()
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="finished run folder (lightning_logs/version_N)")
    parser.add_argument("--out", type=Path, default=None, help="output folder, must not exist (default RUN/peft)")
    parser.add_argument(
        "--train-items", type=int, default=128, help="training items per task the gates are measured on"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward when measuring gates")
    parser.add_argument(
        "--data-dir", default=None, help="local data directory (default: the run's, else $MOSLD_DATA_DIR)"
    )
    parser.add_argument("--verify", action="store_true", help="check peft's logits against mosld's (needs peft)")
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="also measure test accuracy on this many items/task"
    )
    parser.add_argument(
        "--fixed-gates", default=",".join(FIXED_GATES), help="with --eval-limit: the fixed gates scored, "
        "a comma list of task (each task's own) and mixture (default both)"
    )  # fmt: skip
    parser.add_argument(
        "--gates", type=Path, default=None, help="with --eval-limit: score the gates of this gates.json (an earlier "
        "export's) instead of measuring and exporting them; the results go to OUT/gates.json"
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    fixed = [kind for kind in args.fixed_gates.split(",") if kind]
    if not set(fixed) <= set(FIXED_GATES):
        parser.error(f"--fixed-gates: expected a comma list of {' and '.join(FIXED_GATES)}, got {args.fixed_gates!r}")
    if args.gates is not None and not args.eval_limit:
        parser.error("--gates scores earlier gates: give --eval-limit too")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_items < 1:  # by hand: plain argparse, where type=PositiveInt would not say what is expected
        parser.error(f"--train-items: expected a positive number, got {args.train_items}")
    if args.verify and importlib.util.find_spec("peft") is None:
        parser.error("--verify loads the exports with peft, which is not installed (pip install peft)")
    out = args.out or args.run / "peft"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out: {out} exists and is not empty; choose a new folder")
    try:
        model_args, data_args = read_run(args.run)
        earlier = None if args.gates is None else read_earlier_gates(args.gates)  # before the model: fail fast
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    name = model_args["model_name_or_path"]
    started = time.perf_counter()
    model = load_adapter(load_base_model(name, dtype="float32"), args.run / "adapter").eval()
    data = build_data(model_args, data_args, args.data_dir)

    if earlier is not None:
        gates, summary = earlier
    else:
        base_path = resolve_model_path(name) if is_embedded(name) else name  # a folder peft's auto classes can load
        gates, batches = {}, {}
        for task_id in data.train_task_ids:
            task = data.task_names[task_id]
            batches[task] = gate_batches(data, task_id, args.train_items, args.batch_size)
            gates[task] = mean_gates(model, batches[task])
        if MIXTURE in gates:
            parser.error(f"a task is named {MIXTURE!r}, the name of the mixture's export; rename the task")
        gates[MIXTURE] = average_gates(list(gates.values()))
        summary = {"run": str(args.run), "train_items": args.train_items, "seed": GATE_SAMPLE_SEED, "adapters": {}}
        for task, task_gates in gates.items():
            folder = export_peft(model, out / task, task_gates, base_model_name_or_path=base_path)
            entry = {"folder": str(folder), "normalised_entropy": normalised_entropy(task_gates)}
            if args.verify:
                batch = batches.get(task, next(iter(batches.values())))[-1]  # the shortest sequences of the sample
                entry["max_abs_logit_diff"] = verify(model, name, folder, task_gates, batch)
            summary["adapters"][task] = {**entry, "gates": {k: v.tolist() for k, v in task_gates.items()}}
            print(f"{task}: {folder}  " + ", ".join(f"{k}={v}" for k, v in entry.items() if k != "folder"), flush=True)
        (out / "gates.json").write_text(json.dumps(summary, indent=1) + "\n")  # kept if the evaluation is cut short

    if args.eval_limit:
        generation = data_args.get("generation")
        rows, comparisons = measure(model, data, gates, args.eval_limit, args.data_dir, generation, fixed)
        summary["accuracy"], summary["paired"] = rows, comparisons
        command = "python scripts/export_peft.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        print(f"\n`{command}` (test split, {torch.get_num_threads()} threads, {time.perf_counter() - started:.0f} s)\n")
        print(accuracy_table(rows, normalised_entropy(gates[MIXTURE])))
        print("\n" + paired_lines(comparisons))
        out.mkdir(parents=True, exist_ok=True)
        (out / "gates.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_earlier_gates(file: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``--gates FILE``: the gates an earlier export measured (every adapter's, the mixture's among them) and the
    summary that the scores go into."""
    try:
        gates, earlier = read_export_gates(file)
    except ValueError as err:
        raise ValueError(f"--gates {err}") from None
    if MIXTURE not in gates:
        raise ValueError(f"--gates {file}: has no {MIXTURE!r} gates")
    summary = {key: earlier[key] for key in ("run", "train_items", "seed") if key in earlier}
    return gates, summary | {"gates_from": str(file), "adapters": earlier["adapters"]}


if __name__ == "__main__":
    main()
