"""Record files of a test pass, and topping up a finished record with test tasks it lacks.

A top-up tests a finished run on the missing tasks only, from its kept adapter (turned into a checkpoint that
holds only the adapter tensors, like the training checkpoints) or its fit's last checkpoint, then merges the
tasks' metrics, predictions and routing into the record, atomically. The run's in-domain tasks, average and
training figures are left as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..adapters.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from ..data.tasks import task_name
from .metrics import record_average


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def read_test_dir(test_dir: Path) -> tuple[dict[str, dict], list[str], dict]:
    """A test pass's results: ({task: {metric: value}}, prediction lines, {task: routing statistics})."""
    history = json.loads((test_dir / "eval_metrics.json").read_text())
    metrics = [h for h in history if h["stage"] == "test"][-1]
    tasks: dict[str, dict] = {}
    for key, value in metrics.items():
        if key.startswith("test/") and key.count("/") == 2:
            _, task, name = key.split("/")
            tasks.setdefault(task, {})[name] = value
    predictions = (test_dir / "test_predictions.jsonl").read_text().splitlines()
    routing_file = test_dir / "test_routing.json"
    routing = json.loads(routing_file.read_text()) if routing_file.is_file() else {}
    return tasks, predictions, routing


def adapter_checkpoint(adapter_dir: Path, method: str, out: Path) -> Path:
    """A checkpoint ``test --ckpt_path`` loads, holding the adapter of ``adapter_dir`` (exported at the end of
    the fit) under the module's parameter names, as the fit's own checkpoints hold only adapter tensors.

    Raises:
        ValueError: the adapter was trained with another method than the run's (names the file and field).
    """
    import lightning

    config = read_adapter_config(adapter_dir)
    if config["adapter"].get("method") != method:
        raise ValueError(
            f"{adapter_dir / CONFIG_NAME}: field 'adapter.method' is {config['adapter'].get('method')!r}, but the "
            f"record is of a {method!r} run"
        )
    tensors = load_file(adapter_dir / WEIGHTS_NAME)
    # AdapterExport strips the module's "model." prefix (the LightningModule holds the HF model as .model)
    state = {f"model.{name}": value for name, value in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "pytorch-lightning_version": lightning.__version__}, out)
    return out


def merge_into_record(record: Path, results: tuple[dict, list[str], dict], train_tasks: list[str],
                      note: dict) -> None:  # fmt: skip
    """Add a top-up's tasks to ``record`` (metrics.json, predictions.jsonl, routing.json), atomically.

    Tasks the record already has are refused rather than overwritten: a record's results come from one model.
    """
    tasks, predictions, routing = results
    metrics = json.loads((record / "metrics.json").read_text())
    clash = sorted(set(tasks) & set(metrics["tasks"]))
    if clash:
        raise ValueError(f"{record / 'metrics.json'}: field 'tasks' already holds {clash}; a top-up only adds tasks")
    trained = {task_name(t) for t in train_tasks}
    metrics["tasks"] |= tasks
    metrics["out_of_domain"] = list(metrics["out_of_domain"]) + [t for t in tasks if t not in trained]
    metrics["in_domain"] = list(metrics["in_domain"]) + [t for t in tasks if t in trained]
    if metrics.get("average") and any(t in trained for t in tasks):  # an in-domain task added: a new average
        metrics["average"] = record_average(metrics["tasks"], metrics["in_domain"])
    metrics["test_seconds"] = metrics.get("test_seconds", 0.0) + note.get("test_seconds", 0.0)
    metrics["topped_up"] = [*metrics.get("topped_up", []), note]
    tmp = record.with_name(record.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(record, tmp)
    with (tmp / "predictions.jsonl").open("a") as handle:
        handle.write("".join(line + "\n" for line in predictions))
    if routing:
        old = json.loads((tmp / "routing.json").read_text()) if (tmp / "routing.json").is_file() else {}
        write_json(tmp / "routing.json", old | routing)
    write_json(tmp / "metrics.json", metrics)
    # the old record goes aside before the new one takes its place, so one of them is always complete
    aside = record.with_name(record.name + ".previous")
    shutil.rmtree(aside, ignore_errors=True)
    record.replace(aside)
    tmp.replace(record)
    shutil.rmtree(aside)
