"""mosld tasks as lm-evaluation-harness tasks: the same items, mosld's own prompts, read from local files.

``export_task`` writes one task's items, with each item's prompt rendered by mosld's template, as
``<name>.jsonl`` and a harness task ``<name>.yaml`` that reads it (``dataset_path: json``), so the harness
scores exactly the prompt and continuations mosld scores, offline. Give the folder to the harness with
``--include_path``. The harness puts ``target_delimiter`` (the template answer's leading space) before each
choice, as its own ARC and OpenBookQA tasks do; its ``acc_norm`` then divides by the choice's character
length without that space, as mosld's ``accuracy_norm`` does (``EncodedItem.choice_chars``).

Example::

    python -m mosld.tools.harness_tasks --tasks arc_easy,openbookqa --limit 300 --out harness_tasks
    python -m mosld.tools.harness --model mosld --model_args run=lightning_logs/version_0 \\
        --include_path harness_tasks --tasks mosld_arc_easy
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from mosld.data.formats import MULTIPLE_CHOICE
from mosld.data.prompts import FAMILY_TEMPLATES, PromptTemplate, get_template
from mosld.data.tasks import EVAL_SAMPLE_SEED, Example, load_task, seeded_sample, task_family, task_kind, task_name

PREFIX = "mosld_"
# acc: summed log-likelihood; acc_norm: per character of the choice; acc_bytes: per UTF-8 byte of it.
METRICS = ("acc", "acc_norm", "acc_bytes")


def harness_row(example: Example, template: PromptTemplate) -> dict:
    """One item as the exported task stores it: mosld's full prompt, the choices as the harness appends them."""
    context, body, answers = template.render(example)
    choices = [a[len(template.delimiter) :] for a in answers]
    return {"prompt": context + body, "choices": choices, "label": example.label}


def task_config(name: str, data_file: Path, delimiter: str) -> dict:
    """The harness task config of an exported task."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }


def export_task(
    task: str,
    out: str | Path,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
    template: str | PromptTemplate | None = None,
) -> str:
    """Write ``<out>/mosld_<task>.jsonl`` and ``.yaml``; returns the harness task name.

    Args:
        task: Registry name or user task path (as ``mosld.evaluate`` takes).
        out: Folder to write into (created).
        split: Split to export.
        data_dir: Local data directory (default ``$MOSLD_DATA_DIR``).
        limit: At most this many items: mosld's seeded evaluation sample, the items ``mosld.evaluate(limit=...)``
            scores.
        template: Prompt template (default: the task family's, as mosld evaluates).
    """
    if task_kind(task, data_dir) != MULTIPLE_CHOICE:
        raise ValueError(
            f"task {task!r} is a generation task: harness_tasks exports multiple-choice tasks only (score a "
            "generation task with mosld.evaluate or `main.py test`; lm-evaluation-harness has its own bAbI and GSM8K)"
        )
    template = get_template(template or FAMILY_TEMPLATES[task_family(task)])
    examples = seeded_sample(load_task(task, split, data_dir), limit, EVAL_SAMPLE_SEED)
    name = PREFIX + task_name(task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{name}.jsonl"
    with open(data_file, "w") as handle:
        for example in examples:
            handle.write(json.dumps(harness_row(example, template)) + "\n")
    config = task_config(name, data_file, template.delimiter)
    (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return name


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mosld.tools.harness_tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", required=True, help="comma-separated mosld task names or user task paths")
    parser.add_argument("--out", required=True, help="folder for the task files (give it to --include_path)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--limit", type=int, default=None, help="mosld's seeded sample of this many items per task")
    parser.add_argument("--data_dir", default=None, help="local data directory (default $MOSLD_DATA_DIR)")
    args = parser.parse_args(argv)
    for task in filter(None, args.tasks.split(",")):
        print(export_task(task, args.out, args.split, args.data_dir, args.limit))


if __name__ == "__main__":
    main()
