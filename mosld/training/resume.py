"""What a checkpoint given with ``--ckpt_path`` may and may not change (docs/reliability.md).

LightningCLI's own behaviour is to load the checkpoint's hyperparameters over the parsed config,
which silently drops what the user wrote. Here the config the user gave is what runs: options that
change the adapter's structure (its tensors would not fit) are refused, listing each field with both
values; every other option takes effect, and the ones that differ from the checkpoint are listed.
"""

from __future__ import annotations

from ..adapters import AdapterConfig

# Fields that decide which adapter tensors exist and their shapes, or the base model they adapt.
STRUCTURAL_ADAPTER_FIELDS = ("method", "r", "num_experts", "target_modules", "share", "top_k")
STRUCTURAL_MODEL_FIELDS = ("model_name_or_path",)


def _model_options(hparams: dict) -> dict:
    """``model.*`` options by their command-line names, the adapter's resolved through ``AdapterConfig``."""
    adapter = hparams.get("adapter")
    if not isinstance(adapter, AdapterConfig):
        adapter = AdapterConfig.from_dict(dict(adapter)) if adapter else AdapterConfig()
    options = {f"model.{k}": v for k, v in hparams.items() if k != "adapter" and not k.startswith("_")}
    options.update({f"model.adapter.{k}": v for k, v in adapter.to_dict().items()})
    return options


def compare_with_checkpoint(saved: dict, given: dict) -> tuple[list[str], list[str]]:
    """(structural, other) differences between a checkpoint's hyperparameters and the given model options.

    Args:
        saved: The checkpoint's ``hyper_parameters``.
        given: The parsed ``model`` options (``adapter`` as a dict, an ``AdapterConfig`` or None).

    Returns:
        Lines ``option: checkpoint X, given Y``; structural ones first.
    """
    before, now = _model_options(saved), _model_options(given)
    structural_names = {f"model.{k}" for k in STRUCTURAL_MODEL_FIELDS} | {
        f"model.adapter.{k}" for k in STRUCTURAL_ADAPTER_FIELDS
    }
    structural, other = [], []
    for name in sorted(set(before) & set(now)):
        if before[name] != now[name]:
            line = f"{name}: checkpoint {before[name]!r}, given {now[name]!r}"
            (structural if name in structural_names else other).append(line)
    return structural, other


def checkpoint_batch_size(checkpoint: dict) -> int | None:
    """The training batch size (per process) a checkpoint's data position is counted in, if it says.

    The training loader's state (``ResumableLoader.state_dict``) records it; resuming counts the
    batches already drawn in that size, so another size cannot resume the same sample order.
    """
    loops = checkpoint.get("loops")
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    state = fit_loop.get("state_dict") if isinstance(fit_loop, dict) else None
    loaders = state.get("combined_loader") if isinstance(state, dict) else None
    sizes = {s.get("batch_size") for s in loaders or [] if isinstance(s, dict) and s.get("batch_size") is not None}
    return sizes.pop() if len(sizes) == 1 else None


def adopt_optimizer_options(checkpoint: dict, learning_rate: float, weight_decay: float) -> None:
    """Make the given learning rate and weight decay take effect over the optimizer state being restored.

    The saved optimizer and LR-scheduler state carry the old peak rate (``initial_lr``, ``base_lrs``)
    and weight decay; the scheduled rate of the next step is recomputed from them when training
    starts (``MoSLDModule.on_train_start``).
    """
    for optimizer in checkpoint.get("optimizer_states") or []:
        for group in optimizer.get("param_groups", []):
            group["initial_lr"] = learning_rate
            group["weight_decay"] = weight_decay
    for scheduler in checkpoint.get("lr_schedulers") or []:
        if scheduler.get("base_lrs"):
            scheduler["base_lrs"] = [learning_rate] * len(scheduler["base_lrs"])
