"""Callbacks that log and show a fit as it runs: router statistics (TensorBoard scalars, histograms and
heat-maps, and each evaluation's expert load per task in ``<stage>_routing.json``), parameter counts, and the
step time in the progress bar; and ``run_dir`` / ``json_safe``, which every callback that writes uses.

The files a run leaves for later (adapter, evaluation summary, predictions, run record) are written by the
callbacks of ``records.py``; those that stop or save a failing fit are in ``safety.py``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..adapters import adapter_layers, router_stats, set_router_stats
from ..plots import heatmap_panels
from ..router_scalars import router_scalars, short_layer_name


def run_dir(trainer: L.Trainer) -> Path:
    """The run's log folder (``lightning_logs/version_N``), or the trainer's root dir without a logger.

    A collective under DDP (``trainer.log_dir`` broadcasts rank 0's folder): call it on every rank.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def json_safe(value):
    """``value`` with NaN and infinite floats replaced by None, so that what is written is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RouterStatsCallback(L.Callback):
    """Logs routing entropy and expert load to TensorBoard.

    Statistics are collected only on the logged training steps and over each validation and test
    epoch, so the training hot path pays nothing otherwise. Scalars, a few per logging point so that
    the per-task metrics stay readable in the Scalars tab: ``router/entropy`` (mean over layers),
    ``router/load_max`` and ``router/load_min`` (the largest and smallest expert load of any layer whose
    router chooses, i.e. with more experts than top-k; the load of expert i is the fraction of tokens whose
    top-k holds it, summing to top_k over a layer's experts, so top_k / experts is a balanced load).
    Per-layer and per-expert detail is in a histogram of the loads and the figures: a labelled layer x
    expert heat-map of the load (``router/load_heatmap``) and, for evaluation, one panel per task
    (``val_router/load_by_task``). Validation statistics go under ``val_router/``, test statistics under
    ``test_router/``; evaluation's per-task loads are also written to ``<run dir>/<stage>_routing.json``
    (task -> layer -> load per expert, tokens).

    Args:
        every_n_steps: Collect and log training statistics on every n-th optimizer step.
        per_layer_scalars: Also log each layer's entropy and largest load as scalars
            (``router/entropy/<layer>``, ``router/load_max/<layer>``): two per adapted layer.
        per_expert_scalars: Also log each expert's load as its own scalar (``router/load/<layer>/e<i>``):
            one per expert per layer, hundreds for the default run.
        heatmap: Log the heat-map figures and the load histogram.
    """

    def __init__(self, every_n_steps: int = 50, per_layer_scalars: bool = False, per_expert_scalars: bool = False,
                 heatmap: bool = True) -> None:  # fmt: skip
        self.every_n_steps = every_n_steps
        self.per_layer_scalars = per_layer_scalars
        self.per_expert_scalars = per_expert_scalars
        self.heatmap = heatmap
        self._task_stats: dict[int, dict] = {}
        self._current_task: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % self.every_n_steps == 0 or trainer.global_step == 0:
            set_router_stats(pl_module.base, True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = router_stats(pl_module.base)
        if stats:
            set_router_stats(pl_module.base, False)
            self._log(trainer, pl_module, stats, "router")

    # Evaluation: statistics per dataloader (= task), read whenever the dataloader changes.
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        set_router_stats(pl_module.base, True)
        self._task_stats, self._current_task = {}, None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._switch_task(pl_module, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._eval_epoch_end(trainer, pl_module, "val")

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_start = on_validation_batch_start

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._eval_epoch_end(trainer, pl_module, "test")

    def _switch_task(self, pl_module, task: int | None) -> None:
        if task != self._current_task:
            if self._current_task is not None:
                self._task_stats[self._current_task] = router_stats(pl_module.base)
            self._current_task = task

    def _eval_epoch_end(self, trainer, pl_module, stage: str) -> None:
        self._switch_task(pl_module, None)
        set_router_stats(pl_module.base, False)
        routed = {n: m.num_experts for n, m in adapter_layers(pl_module.base).items() if m.lora_router is not None}
        names = list(getattr(trainer.datamodule, "task_names", None) or range(len(self._task_stats)))
        if not routed or not self._task_stats:
            return
        # Token-weighted sums [load (N), mean_prob (N), entropy, tokens] of every (task, layer), summed over
        # ranks in one collective (a rank without a task's items adds zeros).
        device, pieces = pl_module.device, []
        for i in range(len(names)):
            for layer, n in routed.items():
                s = self._task_stats.get(i, {}).get(layer)
                if s is None:
                    pieces.append(torch.zeros(2 * n + 2, device=device))
                    continue
                tokens = s["tokens"].reshape(1)
                pieces.append(torch.cat([s["load"] * tokens, s["mean_prob"] * tokens, s["entropy"] * tokens, tokens]))
        sums = iter(trainer.strategy.reduce(torch.cat(pieces), reduce_op="sum").split([p.numel() for p in pieces]))
        per_task = {}
        for task in names:
            entry = {}
            for layer, n in routed.items():
                v = next(sums)
                tokens, total = v[-1], v[-1].clamp_min(1.0)
                entry[layer] = {"load": v[:n] / total, "mean_prob": v[n : 2 * n] / total, "entropy": v[2 * n] / total,
                                "tokens": tokens}  # fmt: skip
            if any(float(e["tokens"]) > 0 for e in entry.values()):
                per_task[str(task)] = entry
        if not per_task:
            return
        combined = {}
        for layer in routed:
            parts = [e[layer] for e in per_task.values()]
            tokens = sum(p["tokens"] for p in parts)
            combined[layer] = {k: sum(p[k] * p["tokens"] for p in parts) / tokens.clamp_min(1.0)
                               for k in ("load", "mean_prob", "entropy")} | {"tokens": tokens}  # fmt: skip
        self._log(trainer, pl_module, combined, f"{stage}_router", reduce=False)
        self._write_task_loads(run_dir(trainer), per_task, stage)
        if self.heatmap:
            self._log_task_figure(trainer, per_task, f"{stage}_router")

    @rank_zero_only
    def _write_task_loads(self, folder: Path, per_task: dict, stage: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            task: {layer: {"load": s["load"].tolist(), "mean_prob": s["mean_prob"].tolist(),
                           "entropy": float(s["entropy"]), "tokens": int(s["tokens"])}
                   for layer, s in entry.items()}
            for task, entry in per_task.items()
        }  # fmt: skip
        (folder / f"{stage}_routing.json").write_text(json.dumps(record, indent=1) + "\n")

    @rank_zero_only
    def _log_task_figure(self, trainer, per_task: dict, prefix: str) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_figure"):
            return
        panels = [
            (task, *layer_expert_grid({k: s["load"] for k, s in entry.items()})) for task, entry in per_task.items()
        ]
        figure = heatmap_panels(panels, "expert", "share of tokens (top-k)", f"{prefix}: expert load by task")
        experiment.add_figure(f"{prefix}/load_by_task", figure, trainer.global_step)

    def _log(self, trainer, pl_module, stats: dict, prefix: str, reduce: bool = True) -> None:
        if reduce:  # ranks see different tokens: average their per-layer means, one collective for all layers
            flat = torch.cat([torch.cat([s["load"], s["entropy"].reshape(1)]) for s in stats.values()])
            parts = trainer.strategy.reduce(flat, reduce_op="mean").split(
                [s["load"].numel() + 1 for s in stats.values()]
            )
            stats = {name: {"load": v[:-1], "entropy": v[-1]} for name, v in zip(stats, parts, strict=True)}
        metrics = router_scalars(stats, prefix, self.per_layer_scalars, self.per_expert_scalars)
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.heatmap:
            self._log_heatmap(trainer, {name: s["load"] for name, s in stats.items()}, prefix)

    @rank_zero_only
    def _log_heatmap(self, trainer, loads: dict[str, torch.Tensor], prefix: str) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_figure"):
            return
        grid, labels = layer_expert_grid(loads)
        figure = heatmap_panels([(f"step {trainer.global_step}", grid, labels)], "expert",
                                "share of tokens (top-k)", f"{prefix}: expert load per layer")  # fmt: skip
        experiment.add_figure(f"{prefix}/load_heatmap", figure, trainer.global_step)
        experiment.add_histogram(
            f"{prefix}/load", torch.cat([v.float().cpu() for v in loads.values()]), trainer.global_step
        )


def layer_expert_grid(loads: dict[str, torch.Tensor]) -> tuple[np.ndarray, list[str]]:
    """Per-layer expert loads -> a (layers, max experts) matrix, NaN where a layer has fewer experts, and
    the short layer names (``L03.q_proj``) as row labels."""
    width = max(len(v) for v in loads.values())
    grid = np.full((len(loads), width), np.nan)
    for i, v in enumerate(loads.values()):
        grid[i, : len(v)] = torch.as_tensor(v).float().cpu().numpy()
    return grid, [short_layer_name(name) for name in loads]


class ParameterCountCallback(L.Callback):
    """Logs and prints trainable vs total parameters when fitting starts."""

    # Not Lightning's ModelSummary: it prints a per-layer table and logs nothing; its totals are these counts.

    def on_fit_start(self, trainer, pl_module) -> None:
        trainable, total = pl_module.parameter_counts()
        rank_zero_info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
        for logger in pl_module.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)


class StepTimeProgressBar(TQDMProgressBar):
    """The usual progress bar plus the mean wall time of the last training steps (``step_ms``)."""

    # Not Lightning's ThroughputMonitor: that logs rates to the loggers (new keys), never to the progress bar.

    def __init__(self, refresh_rate: int = 1, window: int = 20) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.window = window
        self._times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._times = (self._times + [now - self._last])[-self.window :]
        self._last = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not step time
        super().on_validation_start(trainer, pl_module)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        if self._times:
            metrics["step_ms"] = f"{1000 * sum(self._times) / len(self._times):.0f}"
        return metrics
