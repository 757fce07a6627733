"""Zero-shot multiple-choice accuracy of a base model on mosld's tasks, printed as a markdown table.

Example (the table in docs/zero_shot.md):
    python scripts/zero_shot.py --data-dir ../shared/data --limit 500
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from mosld.data.tasks import PAPER_TASKS
from mosld.evaluation import SCORINGS, evaluate
from mosld.models import load_base_model, load_tokenizer


def parse_templates(values: list[str], tasks: list[str]) -> dict[str, str]:
    """``NAME`` applies to every task, ``TASK=NAME`` to one."""
    templates: dict[str, str] = {}
    for value in values:
        task, _, name = value.rpartition("=")
        templates.update({task: name} if task else dict.fromkeys(tasks, name))
    return templates


def markdown_table(result: dict) -> str:
    """One row per task and a macro-average row; the headline column first."""
    headline = result["headline"]
    columns = [headline] + [c for c in SCORINGS if c != headline and c in next(iter(result["metrics"].values()))]
    lines = [
        "| task | items | " + " | ".join(columns) + " | seconds |",
        "|---|---:|" + "---:|" * len(columns) + "---:|",
    ]
    for task, metrics in result["metrics"].items():
        cells = " | ".join(f"{metrics[c]:.4f}" for c in columns)
        lines.append(f"| {task} | {metrics['num_items']} | {cells} | {metrics['seconds']:.0f} |")
    macro = " | ".join(f"**{result['macro'][c]:.4f}**" if c in result["macro"] else "" for c in columns)
    lines.append(f"| **macro average** | | {macro} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m", help="base model: hub id, folder or embedded:<key>")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), help="registry names or user task paths")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument(
        "--limit", type=int, default=None, help="fixed seeded sample of at most this many items per task"
    )
    parser.add_argument("--data-dir", default=None, help="local data directory (default $MOSLD_DATA_DIR, else the hub)")
    parser.add_argument("--template", action="append", default=[], help="NAME for all tasks, or TASK=NAME; repeatable")
    parser.add_argument("--method", default="loglik", choices=["loglik", "generate"])
    parser.add_argument("--batch-size", type=int, default=8, help="items per forward pass")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the full result to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = load_base_model(args.model, dtype=args.dtype).to(device)
    tokenizer = load_tokenizer(args.model)
    result = evaluate(
        model,
        tokenizer,
        args.tasks,
        split=args.split,
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        method=args.method,
        templates=parse_templates(args.template, args.tasks),
        verbose=True,
    )
    seconds = time.perf_counter() - started
    command = "python scripts/zero_shot.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(
        f"\n`{command}` ({args.model}, split {args.split}, {device}, {torch.get_num_threads()} threads, {seconds:.0f} s)\n"
    )
    print(markdown_table(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**result, "command": command, "model": args.model, "seconds": seconds}, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
