"""The learning-rate schedule: the rate of every optimizer step, for each ``lr_schedule`` and warm-up form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mosld.training.module import MoSLDModule


def scheduled_rates(schedule: str, warmup: float, total: int, lr: float = 1e-3, extra: int = 2) -> list[float]:
    """The rate each of ``total + extra`` optimizer steps runs with, as ``configure_optimizers`` schedules it
    for a run of ``total`` steps (the extra steps show what happens past the planned end)."""
    module = MoSLDModule(learning_rate=lr, warmup=warmup, lr_schedule=schedule)
    module.probe = torch.nn.Parameter(torch.zeros(1))  # stands in for the adapters: no base model is loaded
    module.trainer = SimpleNamespace(estimated_stepping_batches=total)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(total + extra):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def reference_factor(schedule: str, warmup_steps: int, total: int, step: int) -> float:
    """The schedule as specified: a linear warm-up to the peak that never runs at 0 ((step + 1) / (warmup + 1)),
    then cosine or linear decay to 0 at ``total`` (and 0 after it), or the peak held."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


# (warmup option, total steps, the warm-up steps it means): 0, a step count, a fraction of the total (rounded
# half to even: 0.5 of 5 is 2), a warm-up as long as or longer than the run, a one-step run.
CASES = [
    (0, 1, 0),
    (0, 10, 0),
    (3, 10, 3),
    (1, 4, 1),
    (0.06, 50, 3),
    (0.5, 5, 2),
    (0.3, 5, 2),
    (0.25, 8, 2),
    (5, 5, 5),
    (7, 5, 7),
    (2, 1, 2),
    (0.06, 1000, 60),
]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("warmup", "total", "warmup_steps"), CASES)
def test_every_step_runs_at_the_specified_rate(schedule, warmup, total, warmup_steps):
    lr = 3e-4
    expected = [lr * reference_factor(schedule, warmup_steps, total, step) for step in range(total + 2)]
    assert scheduled_rates(schedule, warmup, total, lr=lr) == expected  # exactly, every step


def test_the_rates_of_a_short_run_by_hand():
    """Warm-up 2 of 5 steps at peak 1 (and two steps past the end): the first step runs at 1/3, not at 0."""
    assert scheduled_rates("cosine", 2, 5, lr=1.0) == pytest.approx([1 / 3, 2 / 3, 1, 0.75, 0.25, 0, 0], abs=1e-12)
    assert scheduled_rates("linear", 2, 5, lr=1.0) == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0, 0], abs=1e-12)
    assert scheduled_rates("constant", 2, 5, lr=1.0) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1], abs=1e-12)
    half = math.cos(math.pi / 4) / 2
    assert scheduled_rates("cosine", 0, 4, lr=1.0) == pytest.approx([1, 0.5 + half, 0.5, 0.5 - half, 0, 0], abs=1e-12)
    assert scheduled_rates("linear", 0.5, 4, lr=1.0) == pytest.approx([1 / 3, 2 / 3, 1, 0.5, 0, 0], abs=1e-12)
