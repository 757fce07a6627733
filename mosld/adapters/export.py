"""Collapsing a mixture with fixed gates into a standard LoRA adapter in peft's file format.

For fixed gates ``g`` (``mosld.adapters.static``) a layer's update is one low-rank product
(docs/serving.md)::

    MoSL/MoSLD (shared A):  (alpha / r) * sum_k g_k B_k A x   = (alpha / r) * (sum_k g_k B_k) A x        rank r
    share-B (shared B):     (alpha / r) * sum_k g_k B A_k x   = (alpha / r) * B (sum_k g_k A_k) x        rank r
    MoLA (own A and B):     (alpha / r) * sum_k g_k B_k A_k x = (alpha / r) * [g_1 B_1 .. g_N B_N] [A_1; ..; A_N] x

The last is a LoRA of rank ``N * r``; peft scales a module by ``lora_alpha / rank``, so its alpha is
``N * alpha`` there (``rank_pattern`` / ``alpha_pattern`` where modules differ). The folder holds
``adapter_config.json`` and ``adapter_model.safetensors`` as peft writes them (tensor names
``base_model.model.<module>.lora_A.weight``, ``lora_A`` (rank, d_in), ``lora_B`` (d_out, rank)), so
``peft.PeftModel.from_pretrained(base, folder)`` and LoRA servers load it; mosld itself does not
need peft. ``gates.json`` beside them records the gates used.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .inject import adapter_layers
from .layer import MoSLDLinear, _is_conv1d
from .static import GateVectors, check_gates

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
GATES_NAME = "gates.json"
PEFT_PREFIX = "base_model.model."  # how peft names a causal LM's modules inside its PeftModel


def collapse_layer(layer: MoSLDLinear, gates: Tensor | None) -> tuple[Tensor, Tensor, float]:
    """The plain LoRA ``(A', B', lora_alpha)`` equal to ``layer`` with fixed ``gates``.

    ``A'`` is (rank, d_in), ``B'`` (d_out, rank), and ``lora_alpha / rank`` is the layer's scaling.
    Computed in float64, returned in the adapter's dtype.

    Args:
        layer: An adapter layer (not merged).
        gates: (N,) fixed gates; ``None`` only for a layer without router (method ``lora``).
    """
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    if layer.lora_router is None:
        new_a, new_b = a, b
    else:
        if gates is None:
            raise ValueError("collapse_layer: a routed layer needs its gates")
        g, n, r = gates.detach().double().cpu().to(a.device), layer.num_experts, layer.r
        if layer.num_a == 1:  # shared A: one B' = sum_k g_k B_k
            new_a, new_b = a, torch.einsum("onr,n->or", b.view(b.shape[0], n, r), g)
        elif layer.num_b == 1:  # shared B: one A' = sum_k g_k A_k
            new_a, new_b = torch.einsum("n,nrd->rd", g, a.view(n, r, a.shape[1])), b
        else:  # own A and B per expert: the gate-scaled Bs beside each other, the As stacked
            new_a, new_b = a, b * g.repeat_interleave(r)
    dtype = layer.lora_A.dtype
    return new_a.to(dtype).contiguous(), new_b.to(dtype).contiguous(), layer.scaling * new_a.shape[0]


def peft_config(
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    target_modules: list[str],
    base_model_name_or_path: str,
    fan_in_fan_out: bool,
) -> dict:
    """peft's ``LoraConfig`` as JSON: the most common rank/alpha, patterns for the modules that differ."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        # full module names: peft matches pattern keys against the end of each module's name
        "rank_pattern": {name: v for name, v in ranks.items() if v != r},
        "alpha_pattern": {name: v for name, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_peft(
    model: nn.Module,
    folder: str | Path,
    gates: GateVectors | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter of ``model`` with fixed ``gates`` as a standard peft LoRA folder.

    Args:
        model: A model with injected adapters (any method).
        folder: Output folder; created, and refused if it exists and is not empty.
        gates: One gate vector per routed layer (``mean_gates``); ``None`` for method ``lora``.
        base_model_name_or_path: Recorded in ``adapter_config.json``; default the model's
            ``config.name_or_path``.

    Returns:
        The folder written. ``peft.PeftModel.from_pretrained(base, folder)`` on the stock base
        gives the same outputs as ``model`` under ``set_static_gates(model, gates)``.

    Raises:
        ValueError: no adapters, merged adapters, bad gates (see ``check_gates``), or a non-empty
            ``folder``.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no adapters (call mosld.inject_adapters first)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("export_peft: unmerge the adapters first (mosld.unmerge_adapters)")
    if gates is None and any(layer.lora_router is not None for layer in layers.values()):
        raise ValueError(
            "export_peft: gates are required for a routed mixture (one vector per routed module); "
            "measure them with mosld.mean_gates"
        )
    checked = check_gates(model, gates if gates is not None else {})
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"export_peft: {folder} exists and is not an empty folder; choose a new one or empty it")
    conv1d = {_is_conv1d(layer.base_layer) for layer in layers.values()}
    if len(conv1d) > 1:
        raise ValueError("export_peft: the adapted modules mix nn.Linear and Conv1D; peft takes one layout per adapter")

    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        a, b, alpha = collapse_layer(layer, checked.get(name))
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.cpu()
        ranks[name], alphas[name] = a.shape[0], alpha
    if base_model_name_or_path is None:
        base_model_name_or_path = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    config = getattr(model, "adapter_config", None)
    targets = list(config.target_modules) if config is not None else sorted({n.rsplit(".", 1)[-1] for n in layers})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    meta = peft_config(ranks, alphas, targets, base_model_name_or_path, fan_in_fan_out=conv1d == {True})
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    record = {
        "method": None if config is None else config.method,
        "gates": {name: g.tolist() for name, g in checked.items()},
    }
    (folder / GATES_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return folder


def read_export_gates(file: Path) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """The gates of every adapter in the ``gates.json`` that ``scripts/export_peft.py`` writes beside its exports
    (per name, a training task or ``mixture``: per routed module, the gate vector), and the file's whole record."""
    try:
        record = json.loads(Path(file).read_text())
        gates = {name: {module: torch.tensor(values) for module, values in entry["gates"].items()}
                 for name, entry in record["adapters"].items()}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{file}: expected a gates.json written by scripts/export_peft.py ({err!r})") from None
    return gates, record
