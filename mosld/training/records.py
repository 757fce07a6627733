"""Callbacks that write the files a run leaves for later analysis: the trained adapter, the evaluation summary,
the predictions, every scored evaluation item, and the training record.

``AdapterExport`` writes ``<run dir>/adapter/`` at the end of ``fit``; ``EvalSummary`` prints each evaluation
and writes ``<run dir>/eval_metrics.json``; ``PredictionWriter`` writes ``predict``'s ``predictions.jsonl``.
``ItemPredictionWriter`` writes ``<run dir>/<stage>_predictions.jsonl`` (one line per scored item: task,
stable item id, predicted and gold choice, whether each scoring got it right; for a generation task the
generated text, the references and the score, ``correct`` being the score too); ``TrainRecord`` writes
``<run dir>/train_record.json`` (loss per step, tokens seen, padding, wall time, parameter counts,
machine). All but ``PredictionWriter`` write on rank 0 only (the last two after gathering what the other ranks
hold); under DDP ``PredictionWriter`` writes one file per rank.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..adapters import save_adapter
from ..adapters.inject import clean_name
from ..adapters.layer import is_adapter_parameter
from .callbacks import json_safe, run_dir
from .precision import cpu_bf16_support


class AdapterExport(L.Callback):
    """At the end of ``fit``, writes the trained adapter to ``<run dir>/adapter`` (rank 0 only).

    Under FSDP the full adapter tensors are gathered first (a collective, so every rank calls it).
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname

    def on_fit_end(self, trainer, pl_module) -> None:
        state = trainer.strategy.lightning_module_state_dict()
        folder = run_dir(trainer) / self.dirname
        if trainer.is_global_zero:
            # keys of the LightningModule: "model." + the HF model's names (+ wrapper components)
            adapter = {clean_name(k).removeprefix("model."): v for k, v in state.items() if is_adapter_parameter(k)}
            path = save_adapter(pl_module.base, folder, state_dict=adapter)
            rank_zero_info(f"adapter exported to {path}")
        trainer.strategy.barrier("adapter_export")


class EvalSummary(L.Callback):
    """Prints each validation's headline figures and writes them all to ``<run dir>/eval_metrics.json``,
    so a run's before/after comparison is one file (rank 0 only)."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module, "val", run_dir(trainer))

    def on_test_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module, "test", run_dir(trainer))

    @rank_zero_only
    def _record(self, trainer, pl_module, stage: str, out: Path) -> None:
        metrics = getattr(pl_module, "last_eval_metrics", None)
        if not metrics:
            return
        when = "before training" if trainer.sanity_checking else f"step {trainer.global_step}"
        self.history.append({"stage": stage, "step": trainer.global_step, "when": when, **metrics})
        rank_zero_info(eval_summary_text(metrics, stage, when))
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_metrics.json").write_text(json.dumps(json_safe(self.history), indent=2, allow_nan=False) + "\n")


def natural_key(name: str) -> list:
    """Sort key putting numbered names in numeric order (babi_qa2 before babi_qa10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def eval_summary_text(metrics: dict[str, float], stage: str, when: str) -> str:
    """The printed summary of one evaluation: the headline average(s), then each task's headline metric
    (multiple choice: accuracy; generation: its metric) with its interval and item count."""
    averages = [(name, metrics[f"{stage}/{name}"], metrics[f"{stage}/{name}_ci95"])
                for name in ("score_avg", "acc_avg") if f"{stage}/{name}" in metrics]  # fmt: skip
    head = [f"{name} {value:.3f} ± {ci:.3f}" for name, value, ci in averages]
    if f"{stage}/answer_loss" in metrics:
        head.append(f"answer_loss {metrics[f'{stage}/answer_loss']:.4f}")
    lines = [f"{stage} ({when}): " + ", ".join(head)]
    for t in sorted({k.split("/")[1] for k in metrics if k.count("/") == 2}, key=natural_key):
        task = {k.split("/")[2]: v for k, v in metrics.items() if k.count("/") == 2 and k.split("/")[1] == t}
        name = "acc" if "acc" in task else next(k for k in task if k != "items" and not k.endswith("_ci95"))
        line = f"  {t:>16}: {name} {task[name]:.3f} ± {task[f'{name}_ci95']:.3f} (n={int(task['items'])})"
        if "answer_loss" in task:
            line += f", answer_loss {task['answer_loss']:.4f}"
        lines.append(line)
    return "\n".join(lines)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results as JSONL: one line per question with the predicted choice and
    every choice's scores (sum log-likelihood and length-normalised), or, for a generation task, the
    generated text (and the references the question came with)."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        folder = run_dir(trainer)
        path = Path(self.output) if self.output else folder / "predictions.jsonl"
        if trainer.world_size > 1:  # each rank holds every world_size-th question, from its rank on
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [row for batch in predictions for row in batch]
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        print(f"{len(rows)} predictions written to {path}")


def _gather(rows: list) -> list:
    """Every rank's rows on every rank (a collective under DDP), concatenated in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def machine() -> dict:
    """What the run ran on: enough to tell a laptop from a GPU node in a results table."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["cpu_native_bf16"] = cpu_bf16_support()[0]
    return info


def precision_reason(trainer) -> str:
    """Why the run computes in its precision: ``auto``'s hardware rule, or the explicit option."""
    choice = getattr(trainer, "precision_choice", None)
    return f"auto: {choice.reason}" if choice is not None else "given explicitly (trainer.precision)"


class ItemPredictionWriter(L.Callback):
    """Keeps the prediction of every evaluation item and writes them when the epoch ends.

    A multiple-choice row: ``{"task", "item", "pred", "gold", "correct", "correct_sum", "correct_norm",
    "correct_token_norm"}`` (booleans); a generation row: ``{"task", "item", "generated", "references",
    "score", "correct"}`` with ``correct`` = ``score``, a float in [0, 1], so that paired statistics read any
    task's per-item result from ``correct``.

    Args:
        stages: Evaluation stages to record (``test``, ``val``).
    """

    def __init__(self, stages: tuple[str, ...] = ("test",)) -> None:
        self.stages = tuple(stages)
        self._rows: list[dict] = []

    def _start(self, stage: str) -> None:
        if stage in self.stages:
            self._rows = []

    def _batch(self, trainer, stage: str, outputs, batch, dataloader_idx: int) -> None:
        if stage not in self.stages or not outputs or "item_ids" not in batch:
            return
        task = trainer.datamodule.task_names[dataloader_idx]
        if "generated" in outputs:  # a generation task: the text, its references and its score (in [0, 1])
            for item, text, refs, score in zip(batch["item_ids"], outputs["generated"], batch["references"],
                                               outputs["score"].tolist(), strict=True):  # fmt: skip
                self._rows.append({"task": task, "item": item, "generated": text, "references": list(refs),
                                   "score": float(score), "correct": float(score)})  # fmt: skip
            return
        for i, item in enumerate(batch["item_ids"]):
            self._rows.append({
                "task": task, "item": item, "pred": int(outputs["pred"][i]), "gold": int(batch["gold"][i]),
                "correct": bool(outputs["correct"][i]), "correct_sum": bool(outputs["correct_sum"][i]),
                "correct_norm": bool(outputs["correct_norm"][i]),
                "correct_token_norm": bool(outputs["correct_token_norm"][i]),
            })  # fmt: skip

    def _end(self, trainer, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        rows = _gather(self._rows)
        self._write(run_dir(trainer), stage, sorted(rows, key=lambda r: (r["task"], r["item"])))

    @rank_zero_only
    def _write(self, folder: Path, stage: str, rows: list[dict]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stage}_predictions.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start("test")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start("val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, "test", outputs, batch, dataloader_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, "val", outputs, batch, dataloader_idx)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, "test")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, "val")


class TrainRecord(L.Callback):
    """Records the training curve and what the run cost, and writes it at the end of ``fit``.

    ``loss`` holds the answer-token loss of every optimizer step (rank 0's batch under DDP);
    ``tokens`` counts the real (non-padding) training tokens over all ranks and ``positions`` the
    padded positions they were batched into, so ``1 - tokens / positions`` is the padding fraction.
    """

    # Not Lightning's ThroughputMonitor: rank 0's clock from train start, not real tokens of all ranks, no resume.

    def __init__(self) -> None:
        self.loss: list[tuple[int, float]] = []
        self.tokens = self.positions = 0
        self._start = self._train_seconds = 0.0
        self._batch_start: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()
        mask = batch["attention_mask"]
        counts = torch.tensor([float(mask.sum()), float(mask.numel())], device=mask.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.tokens += int(counts[0])
        self.positions += int(counts[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            self._train_seconds += time.perf_counter() - self._batch_start
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.loss.append((trainer.global_step, float(loss)))

    def on_fit_end(self, trainer, pl_module) -> None:
        trainable, total = pl_module.parameter_counts()
        tail = [v for _, v in self.loss[-max(1, len(self.loss) // 10) :]]
        record = {
            "steps": trainer.global_step,
            "tokens_seen": self.tokens,
            "padded_positions": self.positions,
            "padding_fraction": 1 - self.tokens / max(self.positions, 1),
            "train_seconds": self._train_seconds,
            "train_tokens_per_second": self.tokens / max(self._train_seconds, 1e-9),
            "fit_seconds": time.perf_counter() - self._start,
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "final_train_loss_steps": len(tail),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "precision_reason": precision_reason(trainer),
            "quantization": pl_module.quantization.describe(),
            "gradient_checkpointing": bool(pl_module.hparams.get("gradient_checkpointing", False)),
            "machine": machine(),
            "loss": [[step, value] for step, value in self.loss],
        }
        self._write(run_dir(trainer), record)

    def state_dict(self) -> dict:  # a resumed fit keeps the curve and counts of its first part
        return {"loss": self.loss, "tokens": self.tokens, "positions": self.positions,
                "train_seconds": self._train_seconds}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.loss = [tuple(x) for x in state["loss"]]
        self.tokens, self.positions = state["tokens"], state["positions"]
        self._train_seconds = state["train_seconds"]

    @rank_zero_only
    def _write(self, folder: Path, record: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train_record.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
