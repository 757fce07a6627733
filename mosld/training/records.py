"""Callbacks that write a run's record for later analysis: every scored test item, and the training curve.

``ItemPredictionWriter`` writes ``<run dir>/<stage>_predictions.jsonl`` (one line per scored item: task,
stable item id, predicted and gold choice, whether each scoring got it right; for a generation task the
generated text, the references and the score, ``correct`` being the score too); ``TrainRecord`` writes
``<run dir>/train_record.json`` (loss per step, tokens seen, padding, wall time, parameter counts,
machine). Both write on rank 0 only, after gathering what the other ranks hold.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only

from .callbacks import run_dir
from .precision import cpu_bf16_support


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
