"""The default run's training batches and model, for the benchmarks that time its step."""

from __future__ import annotations

import itertools
import time

import torch

import mosld
from mosld.data import MultiTaskDataModule
from mosld.data.tasks import PAPER_TASKS
from mosld.models import load_base_model

MODEL = "embedded:smollm2-135m"


def default_run_batches(count: int, data_dir: str | None, batch_size: int = 8, max_length: int = 256) -> list[dict]:
    """The first ``count`` training batches of ``configs/mosld.yaml`` (six paper tasks mixed at T = 2)."""
    data = MultiTaskDataModule(
        tasks=list(PAPER_TASKS), model_name_or_path=MODEL, data_dir=data_dir, batch_size=batch_size,
        max_length=max_length, temperature=2.0, num_samples_per_epoch=batch_size * count,
    )  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    return list(itertools.islice(iter(data.train_dataloader()), count))


def default_run_model() -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """SmolLM2-135M with the default MoSLD adapter, in training mode, and its trainable tensors."""
    model = mosld.inject_adapters(load_base_model(MODEL), mosld.AdapterConfig(method="mosld")).train()
    return model, [p for p in model.parameters() if p.requires_grad]


def timed_step(loss_fn, batch: dict, params: list[torch.nn.Parameter], bf16: bool) -> tuple[float, float]:
    """Seconds and loss of one forward + backward (gradients cleared after), in bf16 autocast or fp32."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(batch)
    loss.backward()
    elapsed = time.perf_counter() - start
    for p in params:
        p.grad = None
    return elapsed, loss.item()
