"""MoSLD adapters trained by Hugging Face's ``transformers.Trainer`` or a subclass of it (TRL's ``SFTTrainer``, ...).

::

    model = mosld.inject_adapters(load_base_model("embedded:smollm2-135m"), mosld.AdapterConfig(aux_loss_coef=0.01))
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=..., data_collator=...)
    trainer.add_callback(MoSLDTrainerCallback(trainer))
    trainer.train()  # checkpoints hold the adapter; <output_dir>/adapter is the trained one (mosld.load_adapter)

What ``MoSLDTrainerCallback(trainer)`` changes, and why there:

- **The balancing loss** (``aux_loss_coef`` of the adapter config) is added by a wrapper around the trainer's
  ``compute_loss``, set on that trainer instance. Not by a hook on the model's output: TRL's ``SFTTrainer`` (1.x)
  computes its loss itself from the per-token log-probabilities of its fused LM head and never reads the model's
  ``loss`` (nor does a trainer with ``label_smoothing_factor`` or ``compute_loss_func``), so a model-level
  addition would be silently left out there. ``compute_loss`` is where every trainer makes the loss it
  back-propagates and logs, whatever it computes it from. A forward hook on the model only keeps the balancing
  loss of each forward with autograd on while ``compute_loss`` runs (``mosld.aux_loss``: the mean over the routed
  layers): trainers that run a second, no-grad forward for their metrics would otherwise replace it.
  With gradient accumulation each micro-batch's balancing loss weighs ``1 / steps``, as its LM loss does: the step
  optimises the LM loss plus ``aux_loss_coef`` times the mean balancing loss of its micro-batches (as Lightning's
  ``accumulate_grad_batches`` does in ``mosld.training``).
- **Saving**: every tensor but the adapter's goes into the model's ``_keys_to_ignore_on_save`` (transformers' own
  list of what ``save_pretrained`` leaves out), so ``Trainer.save_model`` and every checkpoint write the adapter
  tensors only (a few MB) in transformers' format, which the Trainer resumes from (``resume_from_checkpoint``)
  without a missing-key warning. Beside them each checkpoint, and ``output_dir`` at the end of training, gets
  ``adapter/`` in mosld's format (``mosld.load_adapter``) and, when ``peft_gate_batches`` is given, ``peft/``: the
  fixed-gate peft LoRA export (``mosld.export_peft`` with the ``mosld.mean_gates`` of those batches).
- **Gradient checkpointing** (``gradient_checkpointing=True``; TRL turns it on by default) is switched to mosld's
  recompute-aware version when training starts, so the recomputed forward counts no routing statistics and no
  balancing loss twice (``mosld.adapters.checkpointing``).
- **Routing**: entropy and expert load (``router/entropy``, ``router/load_max``, ``router/load_min``, as the
  Lightning runs log them) and the balancing loss (``aux_loss``) go through ``Trainer.log`` at the trainer's
  logging steps, so ``log_history`` and every ``report_to`` backend get them; statistics are collected on those
  steps only, and paused while the trainer evaluates (a wrapper around its ``evaluate``).

A bitsandbytes-quantized base: build the trainer inside ``allow_quantized_base(model)``. No Lightning here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapters import (
    adapter_layers,
    aux_loss,
    export_peft,
    mean_gates,
    router_stats,
    save_adapter,
    set_aux_loss,
    set_router_stats,
)
from ..adapters.checkpointing import enable_gradient_checkpointing
from ..adapters.layer import is_adapter_parameter
from ..models import DTYPES
from ..router_scalars import router_scalars

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # mosld's adapter, in each checkpoint folder and in output_dir
PEFT_DIR = "peft"  # the fixed-gate peft export beside it, when asked for
CHECKPOINTING_OPTIONS = ("use_reentrant", "every_n_layers", "offload")


@contextlib.contextmanager
def allow_quantized_base(model: nn.Module) -> Iterator[nn.Module]:
    """Build the ``Trainer`` of a model whose base is bitsandbytes-quantized inside this block.

    transformers refuses to train a quantized model unless peft adapters are attached to it
    (``validate_quantization_for_training``, which reads ``model.is_quantized``); mosld's adapters are the trainable
    part, so the flag reads False while the block runs. It is restored afterwards: it also guards ``.half()`` and
    ``.float()``, which a quantized model must refuse.

    Raises:
        ValueError: the model has no mosld adapters (there would be nothing to train).
    """
    if not adapter_layers(model):
        raise ValueError(
            "allow_quantized_base: the model has no mosld adapters, so it has nothing to train; "
            "inject them first (mosld.inject_adapters or mosld.load_adapter)"
        )
    had_flag = "is_quantized" in vars(model)
    quantized = getattr(model, "is_quantized", False)
    model.is_quantized = False
    try:
        yield model
    finally:
        if had_flag:
            model.is_quantized = quantized
        else:
            del model.is_quantized


class MoSLDTrainerCallback(TrainerCallback):
    """Trains, logs and saves the mosld adapters of ``trainer.model`` with that trainer (see the module docstring).

    Add it with ``trainer.add_callback(MoSLDTrainerCallback(trainer))``; it needs the trainer itself to wrap its
    ``compute_loss`` and to log through ``Trainer.log`` (callbacks passed to the Trainer run after its reporting
    backends, so metrics a callback adds to their ``logs`` never reach them).

    Args:
        trainer: A ``transformers.Trainer`` (or subclass) whose model has mosld adapters and nothing else trainable.
        peft_gate_batches: Batches (``input_ids`` and ``attention_mask``, e.g. a few training batches) whose mean
            top-k gates (``mosld.mean_gates``) fix the routing of a peft LoRA export written to ``peft/`` beside each
            saved adapter; None: no peft export.

    Raises:
        ValueError: the model has no adapters, tensors outside the adapters require grad, or the trainer already
            has a ``MoSLDTrainerCallback``.
    """

    def __init__(self, trainer: Trainer, peft_gate_batches: Sequence[Mapping[str, Tensor]] | None = None) -> None:
        model = trainer.model
        if not adapter_layers(model):
            raise ValueError(
                "MoSLDTrainerCallback: the trainer's model has no mosld adapters; inject them "
                "(mosld.inject_adapters) or load some (mosld.load_adapter) before building the trainer"
            )
        if any(isinstance(c, MoSLDTrainerCallback) for c in trainer.callback_handler.callbacks):
            raise ValueError("MoSLDTrainerCallback: this trainer has one already (a second would add its loss twice)")
        others = [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_parameter(n)]
        if others:
            raise ValueError(
                f"MoSLDTrainerCallback: {len(others)} tensors outside the adapters require grad (e.g. {others[:3]}); "
                "the trainer would optimise them but only adapter tensors are saved: freeze them (requires_grad_(False))"
            )
        self.trainer = trainer
        self.model = model
        self.aux_loss_coef = float(model.adapter_config.aux_loss_coef)
        self.peft_gate_batches = None if peft_gate_batches is None else list(peft_gate_batches)
        self._balances: list[Tensor] | None = None  # the current compute_loss call's balancing losses (with graph)
        self._logged_balances: list[Tensor] = []  # detached, since the last log
        keep_adapter_dtype(model)
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | {
            name for name in model.state_dict() if not is_adapter_parameter(name)
        }
        set_aux_loss(model, self.aux_loss_coef > 0)
        if self.aux_loss_coef > 0:
            model.register_forward_hook(self._keep_balancing_loss)
            trainer.compute_loss = self._with_balancing_loss(trainer.compute_loss)
        trainer.evaluate = self._without_routing_stats(trainer.evaluate)

    # ------------------------------------------------------------------ the balancing loss
    def _keep_balancing_loss(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._balances is not None and module.training and torch.is_grad_enabled():
            balance = aux_loss(module)
            if balance is not None:
                self._balances.append(balance)

    def _with_balancing_loss(self, compute_loss):
        """``compute_loss`` plus ``aux_loss_coef`` times the balancing loss of its forwards (see the module docstring)."""

        @functools.wraps(compute_loss)
        def compute_loss_with_balance(model, inputs, return_outputs=False, num_items_in_batch=None):
            self._balances = []
            try:
                result = compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
                balances = self._balances
            finally:
                self._balances = None
            if not balances:  # evaluation: no balancing loss is computed
                return result
            balance = torch.stack(balances).mean()
            self._logged_balances.append(balance.detach())
            loss, outputs = result if return_outputs else (result, None)
            loss = loss + self.aux_loss_coef * balance.to(loss.dtype) / self._accumulation_share(num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        return compute_loss_with_balance

    def _without_routing_stats(self, evaluate):
        """``evaluate`` with routing statistics paused: an evaluation inside training (``eval_strategy``) would
        otherwise add its tokens to the training statistics not yet logged (with ``logging_strategy="epoch"`` they
        are collected through the whole epoch). Paused, not switched off: switching off drops what was collected."""

        @functools.wraps(evaluate)
        def evaluate_without_routing_stats(*args, **kwargs):
            layers = list(adapter_layers(self.model).values())
            collecting = [layer.collect_router_stats for layer in layers]
            for layer in layers:
                layer.collect_router_stats = False
            try:
                return evaluate(*args, **kwargs)
            finally:
                for layer, flag in zip(layers, collecting, strict=True):
                    layer.collect_router_stats = flag

        return evaluate_without_routing_stats

    def _accumulation_share(self, num_items_in_batch: object) -> int:
        """What this micro-batch's balancing loss is divided by: the accumulation steps when ``compute_loss``
        already normalised the LM loss over the whole accumulated batch (``Trainer.training_step`` then leaves the
        loss as it is), else 1 (``training_step`` divides the whole loss by the steps itself)."""
        trainer = self.trainer
        normalised = getattr(trainer, "loss_is_scaled_for_ga", None)
        if normalised is None:  # Trainer.training_step's own rule
            normalised = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(trainer, "compute_loss_func", None) is not None
            )
        if not normalised:
            return 1
        return getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        # The trainer has just turned on transformers' checkpointing, whose recomputed forward looks like a first one.
        if is_checkpointing(self.model):
            enable_gradient_checkpointing(self.model, **checkpointing_options(args))
        set_router_stats(self.model, False)
        self._logged_balances = []

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if collects_routing(args, state, state.global_step + 1):
            set_router_stats(self.model, True)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if control.should_log:  # DefaultFlowCallback, which runs first, has decided
            self._log_routing(control)
        if args.logging_strategy != "epoch":
            set_router_stats(self.model, False)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if control.should_log:
            self._log_routing(control)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self.save(folder)
            else:  # a hyperparameter search keeps its checkpoints in per-trial folders
                log.warning("MoSLDTrainerCallback: no checkpoint folder %s to save the adapter into", folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        set_router_stats(self.model, False)
        if state.is_world_process_zero:
            self.save(Path(args.output_dir))

    # ------------------------------------------------------------------ saving and logging
    def save(self, folder: str | Path) -> Path:
        """Write the adapter to ``<folder>/adapter`` (mosld's format) and, with ``peft_gate_batches``, its fixed-gate
        peft export to ``<folder>/peft`` (an earlier export there is replaced); returns the adapter folder."""
        folder = Path(folder)
        adapter = save_adapter(self.model, folder / ADAPTER_DIR)
        if self.peft_gate_batches is not None:
            gates = mean_gates(self.model, self.peft_gate_batches)
            staged = Path(tempfile.mkdtemp(prefix=f".{PEFT_DIR}.tmp-", dir=folder))
            try:
                export_peft(self.model, staged / PEFT_DIR, gates)
                shutil.rmtree(folder / PEFT_DIR, ignore_errors=True)
                (staged / PEFT_DIR).rename(folder / PEFT_DIR)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        return adapter

    def _log_routing(self, control: TrainerControl) -> None:
        """Log the routing statistics collected since the last log and the mean balancing loss, averaged over
        processes (every process calls this at the same steps), just before the trainer's own log of the step."""
        metrics: dict[str, float] = {}
        reduce = functools.partial(self.trainer.accelerator.reduce, reduction="mean")
        stats = router_stats(self.model)
        if stats:
            flat = reduce(torch.cat([torch.cat([s["load"], s["entropy"].reshape(1)]) for s in stats.values()]))
            parts = flat.split([s["load"].numel() + 1 for s in stats.values()])
            metrics |= router_scalars(
                {name: {"load": v[:-1], "entropy": v[-1]} for name, v in zip(stats, parts, strict=True)}, "router"
            )
        if self._logged_balances:
            metrics["aux_loss"] = float(reduce(torch.stack(self._logged_balances).float().mean()))
            self._logged_balances = []
        if metrics:
            self.trainer.log(metrics)
            control.should_log = True  # Trainer.log clears it, and the trainer's own log of this step still has to run


def keep_adapter_dtype(model: nn.Module) -> list[str]:
    """Cast adapter tensors back to the config's ``adapter_dtype``; returns the names changed.

    TRL's ``SFTTrainer`` casts every trainable tensor of a 4-bit or 8-bit base to bfloat16 (QLoRA's convention for
    peft adapters); mosld keeps its adapters in ``adapter_dtype``, the dtype its adapter files record.
    """
    dtype = DTYPES[model.adapter_config.adapter_dtype]
    changed = []
    for name, parameter in model.named_parameters():
        if is_adapter_parameter(name) and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            changed.append(name)
    if changed:
        log.info("MoSLDTrainerCallback: %d adapter tensors cast back to adapter_dtype %s", len(changed), dtype)
    return changed


def is_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on for ``model`` (5.x's name, then 4.x's)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(model), name, None), property):
            return bool(getattr(model, name))
    return False


def checkpointing_options(args: TrainingArguments) -> dict:
    """``every_n_layers`` and ``offload`` of the trainer's checkpointing kwargs; a reentrant request is refused."""
    given = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None
    )
    given = dict(given or {})
    if given.get("use_reentrant"):
        raise ValueError(
            "gradient_checkpointing_kwargs: use_reentrant=True runs the recomputation in a way mosld cannot tell from "
            "the first forward, so routing statistics would be counted twice; leave use_reentrant out or set it False"
        )
    unknown = sorted(set(given) - set(CHECKPOINTING_OPTIONS))
    if unknown:
        raise ValueError(
            f"gradient_checkpointing_kwargs: mosld's recompute-aware checkpointing takes {', '.join(CHECKPOINTING_OPTIONS)}; "
            f"got also {unknown}"
        )
    return {key: given[key] for key in ("every_n_layers", "offload") if key in given}


def collects_routing(args: TrainingArguments, state: TrainerState, step: int) -> bool:
    """Whether optimizer step ``step`` ends in a log (as ``DefaultFlowCallback`` decides): routing statistics are
    collected on those steps only; with ``logging_strategy="epoch"`` on all of them."""
    if args.logging_strategy == "epoch":
        return True
    if args.logging_strategy != "steps":
        return False
    return (step == 1 and args.logging_first_step) or step % state.logging_steps == 0
