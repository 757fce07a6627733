"""Putting ``MoSLDLinear`` layers into a stock ``transformers`` causal LM, and model-level helpers."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..dtypes import DTYPES
from .config import AdapterConfig
from .layer import MoSLDLinear, RouterStats, base_shape, is_adapter_parameter

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def num_decoder_layers(model: nn.Module) -> int:
    """Decoder layer count from the model's config (``num_hidden_layers``; GPT-2's ``n_layer``)."""
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError("cannot tell the number of decoder layers: the model's config has no num_hidden_layers")


def _matches(name: str, target: str) -> bool:
    return name.endswith("." + target) or name == target if "." in target else name.rsplit(".", 1)[-1] == target


def find_target_modules(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, nn.Module]:
    """Modules whose name matches a target (last name component, or a dotted suffix)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MoSLDLinear) or ".base_layer" in name:
            continue
        if any(_matches(name, t) for t in target_modules):
            found[name] = module
    return found


def check_targets(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, nn.Module]:
    """``find_target_modules``, refusing a target that matches no module (ValueError naming it and the
    model's linear layers); works on a model built on the meta device, before any weights load."""
    targets = find_target_modules(model, target_modules)
    for t in target_modules:
        if not any(_matches(name, t) for name in targets):
            raise ValueError(
                f"target_modules: {t!r} matches no module of this {type(model).__name__}; "
                f"linear layers it has: {sorted(_linear_leaf_names(model))}"
            )
    return targets


def layer_index(module_name: str) -> int:
    """Decoder layer of a module, from the first number in its dotted name (``model.layers.3.…`` -> 3)."""
    match = _LAYER_INDEX.search("." + module_name + ".")
    if match is None:
        raise ValueError(f"module {module_name!r} is not inside a numbered decoder layer; cannot assign experts")
    return int(match.group(1))


def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every target projection of ``model`` in a ``MoSLDLinear``, in place, and freeze the base.

    Args:
        model: A ``transformers`` causal LM (Llama, Qwen2, Mistral, GPT-2, ...), possibly on the
            meta device (to count parameters without weights).
        config: What to inject.

    Returns:
        The same model; only adapter and router tensors have ``requires_grad``.

    Raises:
        ValueError: a target module matches nothing, is not a Linear/Conv1D, or the expert list
            does not fit the model's layer count.
    """
    if any(isinstance(m, MoSLDLinear) for m in model.modules()):
        raise ValueError("model already has adapters; load a fresh base model to inject again")
    targets = check_targets(model, config.target_modules)
    experts = config.experts_per_layer(num_decoder_layers(model))
    dtype = DTYPES[config.adapter_dtype]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in targets.items():
        try:
            base_shape(base)
        except TypeError as err:
            raise ValueError(f"target_modules: {name} {err}") from None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoSLDLinear(
            base,
            r=config.r,
            alpha=config.alpha,
            num_experts=experts[layer_index(name)],
            top_k=config.top_k,
            share=config.share,
            shared_dropout=config.shared_dropout,
            lora_dropout=config.lora_dropout,
            dtype=dtype,
        )
        layer.train(base.training)  # a new module starts in training mode; follow the model's
        setattr(parent, child, layer)
    model.adapter_config = config
    return model


def _linear_leaf_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


# Wrappers that FSDP, activation checkpointing and torch.compile put into module names.
_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def clean_name(name: str) -> str:
    """A module or parameter name as in the unwrapped model (no FSDP/compile wrapper components)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def adapter_layers(model: nn.Module) -> dict[str, MoSLDLinear]:
    """All ``MoSLDLinear`` layers of a model by module name (wrapper components removed)."""
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, MoSLDLinear)}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter and router tensors, without calling ``state_dict`` (no collectives)."""
    return [clean_name(n) for n, _ in model.named_parameters() if is_adapter_parameter(n)]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter and router tensors, under their full names in ``model``."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_parameter(k)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors (tied embeddings) count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _track_padding(model: nn.Module, layers: list[MoSLDLinear]) -> None:
    """Give the adapter layers each forward's attention mask while any of them collects routing
    statistics or computes the balancing loss, so padding is left out of both (the layers themselves
    only see hidden states).

    Hooks on ``model`` read the ``attention_mask`` keyword of each call (a (batch, positions) 0/1
    mask, as Hugging Face causal LMs take it) and hand it to the layers for that call. When neither
    is on, no hook is left: nothing runs per forward. ``set_router_stats`` and ``set_aux_loss`` call it.
    """
    for handle in model.__dict__.pop("_mosld_padding_hooks", ()):
        handle.remove()
    for layer in layers:
        layer.token_mask = None
    if not any(m.collect_router_stats or m.compute_aux_loss for m in layers):
        return

    def before(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        for layer in layers:
            layer.token_mask = mask

    def after(_module: nn.Module, _args: tuple, _kwargs: dict, _output: object) -> None:
        for layer in layers:
            layer.token_mask = None

    model.__dict__["_mosld_padding_hooks"] = (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    )


def set_aux_loss(model: nn.Module, enabled: bool) -> None:
    """Make every routed layer compute its load-balancing loss in training forwards (padding excluded)."""
    layers = list(adapter_layers(model).values())
    for layer in layers:
        layer.compute_aux_loss = enabled
    _track_padding(model, layers)


def aux_loss(model: nn.Module) -> Tensor | None:
    """Mean load-balancing loss over the routed layers of the last training forward (or None)."""
    losses = [m.aux_loss for m in adapter_layers(model).values() if m.aux_loss is not None]
    if not losses:
        return None
    return torch.stack(losses).mean()


def set_router_stats(model: nn.Module, enabled: bool) -> None:
    """Switch the collection of detached routing statistics on or off (off: nothing on the hot path)."""
    layers = list(adapter_layers(model).values())
    for layer in layers:
        layer.collect_router_stats = enabled
        if not enabled:
            layer.router_stats = None
    _track_padding(model, layers)


def router_stats(model: nn.Module, reset: bool = True) -> dict[str, dict[str, Tensor]]:
    """Per routed layer: ``mean_prob`` (N,), ``load`` (N,) fraction of tokens whose top-k holds
    each expert, ``entropy`` mean routing entropy (nats), ``tokens`` seen since the last reset
    (padding excluded when the forward passed an ``attention_mask`` keyword)."""
    out = {}
    for name, layer in adapter_layers(model).items():
        stats: RouterStats | None = layer.router_stats
        if stats is not None:
            out[name] = stats.summary()
            if reset:
                layer.router_stats = None
    return out


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every (one-expert) adapter into its base weight; routed mixtures raise RuntimeError."""
    layers = adapter_layers(model)
    routed = [n for n, m in layers.items() if m.lora_router is not None]
    if routed:
        raise RuntimeError(
            f"cannot merge {len(routed)} routed mixture layer(s) (e.g. {routed[0]}): the expert gates depend on "
            "each token's input, so no fixed weight is equivalent; only method 'lora' (one expert) can be merged"
        )
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters``: every base weight is restored exactly."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model
