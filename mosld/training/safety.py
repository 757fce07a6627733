"""Callbacks that keep a fit from ending in silent garbage or lost work.

``FiniteGuard`` stops a fit at the first non-finite loss or gradient, before the optimizer step
that would spread it into the adapter. ``PreemptionCheckpoint`` writes a resumable checkpoint when
the process receives SIGTERM (what SLURM and spot instances send before killing a job) and stores
the random-number state in every checkpoint, so that a resumed fit draws the same dropout masks as
an uninterrupted one (docs/reliability.md).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import run_dir

# 128 + SIGTERM: what a shell reports for a job killed by SIGTERM, so schedulers see a stopped job.
PREEMPTED_EXIT_CODE = 143
RNG_KEY = "mosld_rng_states"


class NonFiniteError(RuntimeError):
    """The training loss or a gradient became NaN or infinite; the message names the step and likely causes."""


class FiniteGuard(L.Callback):
    """Stops ``fit`` with ``NonFiniteError`` at the first NaN or infinite training loss or gradient.

    Gradients are checked before clipping and before the optimizer step, so the adapter is never
    updated with them. Under 16-bit mixed precision the gradient scaler skips overflowing steps by
    design, so there only the loss is checked. With several processes the verdict is agreed on by
    all ranks before the optimizer step (one boolean all-reduce), so every rank stops at the same step.
    """

    def __init__(self) -> None:
        self._bad_loss: float | None = None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach())):
            return
        self._bad_loss = float(loss.detach())
        if trainer.world_size == 1:  # stop before the backward pass; several ranks decide together below
            raise NonFiniteError(_explain(trainer, pl_module, f"the training loss is {self._bad_loss}"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        problem = None if self._bad_loss is None else f"the training loss is {self._bad_loss}"
        if problem is None and getattr(trainer.precision_plugin, "scaler", None) is None:
            problem = _non_finite_gradients(pl_module)
        self._bad_loss = None
        if trainer.world_size > 1:
            if trainer.strategy.reduce_boolean_decision(problem is None, all=True):
                return
            problem = problem or "another rank found a NaN or infinite loss or gradient"
        if problem is not None:
            raise NonFiniteError(_explain(trainer, pl_module, problem))


def _non_finite_gradients(module: torch.nn.Module) -> str | None:
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not named:
        return None
    norms = torch._foreach_norm([g for _, g in named])  # one device sync for all gradients
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return None
    bad = [n for (n, _), norm in zip(named, norms, strict=True) if not bool(torch.isfinite(norm))]
    return f"{len(bad)} of {len(named)} gradients hold NaN or infinity (e.g. {bad[0]})"


def _explain(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> str:
    hparams = getattr(pl_module, "hparams", {})
    causes = [
        f"a learning rate too high for this run (model.learning_rate = {hparams.get('learning_rate')}, "
        f"model.warmup = {hparams.get('warmup')}): lower it or warm up longer"
    ]
    if "16" in str(trainer.precision) and "bf16" not in str(trainer.precision):
        causes.append(f"float16 overflow (trainer.precision = {trainer.precision}): use bf16-mixed or 32-true")
    if trainer.gradient_clip_val in (None, 0):
        causes.append("no gradient clipping: set trainer.gradient_clip_val (e.g. 1.0)")
    causes.append("a bad training batch")
    return (
        f"training step {trainer.global_step + 1}: {what}; training stopped and no adapter was exported. "
        f"Likely causes: {'; '.join(causes)}."
    )


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM during ``fit``: write ``<run dir>/checkpoints/preempted.ckpt`` and say how to resume.

    Lightning turns SIGTERM into an exception at the end of the training step under way; this
    callback then saves the run as it stands (adapter, optimizer, LR schedule, loop progress, and
    with the training loader's mid-epoch position the sample order). The CLI exits with status
    143. It also stores the random-number state of torch (CPU and CUDA) and Python in every
    checkpoint and restores it when the first training step after a resume starts, so dropout
    draws continue as in an uninterrupted run.

    Args:
        filename: Name of the checkpoint written on SIGTERM, in the run's ``checkpoints`` folder.
    """

    def __init__(self, filename: str = "preempted.ckpt") -> None:
        self.filename = filename
        self._pending_rng: dict | None = None
        self.saved: Path | None = None

    # ------------------------------------------------------------------ random state
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = {
            "torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending_rng = checkpoint.get(RNG_KEY)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Restored here, not on load: starting the loader draws a seed from torch's generator,
        # which the uninterrupted run did before the checkpoint was written.
        if self._pending_rng is None:
            return
        states, self._pending_rng = self._pending_rng, None
        torch.set_rng_state(states["torch"])
        if states["torch.cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["torch.cuda"])
        random.setstate(states["python"])

    # ------------------------------------------------------------------ SIGTERM
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        folder = run_dir(trainer)
        if trainer.global_step == 0:
            _say("SIGTERM received before the first training step: nothing to save; start the run again.")
            return
        path = folder / "checkpoints" / self.filename
        trainer.save_checkpoint(path)
        self.saved = path
        config = folder / "config.yaml"
        _say(
            f"SIGTERM received: stopped after training step {trainer.global_step}; resumable checkpoint written to "
            f"{path}\nresume with: python main.py fit --config {config if config.is_file() else '<your config>'} "
            f"--ckpt_path {path}"
        )


@rank_zero_only
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
