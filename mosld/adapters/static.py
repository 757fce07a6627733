"""Fixed gates: a routed mixture with the same expert gates for every token.

With the gates of a layer held at one vector ``g`` (N values, non-negative, summing to 1) its
update ``(alpha / r) * sum_k g_k B_k (A_k x)`` no longer depends on the token, so the mixture is
an ordinary LoRA (``mosld.adapters.export``; docs/serving.md). ``mean_gates`` measures such a
vector per routed layer (the mean of the router's top-k gates over real tokens, e.g. of one
task's training items), ``set_static_gates`` makes the layers use it, so that the collapsed and
the routed model can be compared inside mosld.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .inject import adapter_layers
from .layer import MoSLDLinear
from .mixture import topk_gates

GateVectors = Mapping[str, Tensor | Sequence[float]]
SUM_TOLERANCE = 1e-4  # gates read back from JSON carry a few decimals' rounding


def routed_layers(model: nn.Module) -> dict[str, MoSLDLinear]:
    """The adapter layers that have a router (every layer but those of method ``lora``), by module name."""
    return {name: layer for name, layer in adapter_layers(model).items() if layer.lora_router is not None}


def check_gates(model: nn.Module, gates: GateVectors) -> dict[str, Tensor]:
    """Validate one gate vector per routed layer of ``model``.

    Args:
        model: A model with injected adapters.
        gates: Module name -> N gates (a tensor or a list of numbers), for exactly the routed layers.

    Returns:
        The same gates as float32 CPU tensors.

    Raises:
        ValueError: a routed layer has no gates or an unknown module has some, a vector is not 1-D
            with one value per expert, a gate is negative or not finite, or a vector does not sum
            to 1 (within ``SUM_TOLERANCE``); the message names the module.
    """
    if not isinstance(gates, Mapping):
        raise ValueError(f"gates: expected a mapping of module name -> gate vector, got {type(gates).__name__}")
    layers = routed_layers(model)
    missing, unknown = sorted(set(layers) - set(gates)), sorted(set(gates) - set(layers))
    if missing or unknown:
        raise ValueError(
            f"gates: the keys must be the model's {len(layers)} routed modules; "
            f"missing {_some(missing)}, not routed modules of this model {_some(unknown)}"
        )
    checked = {}
    for name, layer in layers.items():
        try:
            g = torch.as_tensor(gates[name], dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"gates[{name}]: expected {layer.num_experts} numbers, got {gates[name]!r:.80} ({err})"
            ) from None
        if g.dim() != 1 or g.numel() != layer.num_experts:
            raise ValueError(
                f"gates[{name}]: expected {layer.num_experts} values (one per expert), got shape {tuple(g.shape)}"
            )
        if not torch.isfinite(g).all() or (g < 0).any():
            bad = int(torch.nonzero(~torch.isfinite(g) | (g < 0))[0])
            raise ValueError(f"gates[{name}]: expert {bad} has gate {g[bad].item()}; expected a number >= 0")
        total = g.sum().item()
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise ValueError(f"gates[{name}]: sum to {total:.6g}, expected 1 (within {SUM_TOLERANCE:g})")
        checked[name] = g.float()
    return checked


def _some(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def set_static_gates(model: nn.Module, gates: GateVectors | None) -> None:
    """Make every routed layer use fixed gates for every token (``None``: route per token again).

    Args:
        model: A model with injected adapters.
        gates: One vector per routed layer, as ``mean_gates`` returns (checked by ``check_gates``).
    """
    layers = routed_layers(model)
    checked = {name: None for name in layers} if gates is None else check_gates(model, gates)
    for name, layer in layers.items():
        g = checked[name]
        layer.static_gates = None if g is None else g.to(layer.lora_router.weight.device)


@torch.no_grad()
def mean_gates(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per routed layer, the mean of the router's top-k gates over the real tokens of ``batches``.

    Args:
        model: A Hugging Face causal LM with injected adapters; run in eval mode (no DropConnect)
            and restored to its mode afterwards. Fixed gates set on it are ignored while measuring.
        batches: Dicts with ``input_ids`` (batch, positions) and optionally ``attention_mask`` (1 for
            real tokens, 0 for padding; absent: every position counts), e.g. training batches.

    Returns:
        Module name -> (N,) float32 CPU tensor, non-negative and summing to 1; ``{}`` for a model
        without routed layers (method ``lora``).
    """
    layers = routed_layers(model)
    if not layers:
        return {}
    sums = {name: torch.zeros(layer.num_experts, dtype=torch.float64) for name, layer in layers.items()}
    weight: list[Tensor | None] = [None]  # the current batch's (tokens,) 0/1 mask
    tokens = 0.0

    def hook(name: str):
        def accumulate(layer: MoSLDLinear, args: tuple) -> None:
            x = args[0]
            w = weight[0]
            if x.shape[:-1].numel() != w.numel():
                raise ValueError(
                    f"mean_gates: {name} saw {tuple(x.shape[:-1])} tokens for an attention mask of {w.numel()}; "
                    "call it on whole-sequence forwards (no KV cache)"
                )
            x2 = x.reshape(-1, x.shape[-1])
            dtype = layer.compute_dtype(x2.dtype)
            logits = nn.functional.linear(x2.to(dtype), layer.lora_router.weight.to(dtype))
            sums[name] += (w.to(torch.float64) @ topk_gates(logits, layer.top_k).to(torch.float64)).cpu()

        return accumulate

    was_training = model.training
    fixed = {name: layer.static_gates for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    model.eval()
    try:
        for layer in layers.values():
            layer.static_gates = None
        device = next(iter(layers.values())).lora_router.weight.device
        # only the adapter layers' inputs are needed: skip the vocabulary projection where the model allows
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
            weight[0] = mask.reshape(-1)
            tokens += float(mask.sum())
            model(input_ids=input_ids, attention_mask=mask, **extra)
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            layer.static_gates = fixed[name]
        model.train(was_training)
    if tokens == 0:
        raise ValueError("mean_gates: the batches hold no real (non-padding) tokens")
    # every token's gates sum to 1, so s.sum() is the token count; dividing by it makes the sum exact
    return {name: (s / s.sum()).float() for name, s in sums.items()}


def average_gates(gate_sets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The per-module mean of several gate sets (e.g. one per task), each set weighing the same."""
    if not gate_sets:
        raise ValueError("average_gates: expected at least one set of gates")
    names = set(gate_sets[0])
    for i, gates in enumerate(gate_sets[1:], start=1):
        if set(gates) != names:
            raise ValueError(f"average_gates: gate set {i} has other modules than gate set 0")
    return {name: torch.stack([torch.as_tensor(g[name]).double() for g in gate_sets]).mean(0).float() for name in names}


def normalised_entropy(gates: Mapping[str, Tensor]) -> float:
    """Mean over modules of ``H(g) / log N``: 1 for uniform gates, 0 when one expert takes everything."""
    values = []
    for g in gates.values():
        g = torch.as_tensor(g).double()
        if g.numel() > 1:
            values.append(float(-(g * g.clamp_min(1e-30).log()).sum()) / math.log(g.numel()))
    return sum(values) / len(values) if values else 0.0
