"""A loop-over-experts MoSLD layer, written the way published mixture-of-LoRA code does it.

HydraLoRA, MoLA, LoRAMoE and MoE-PEFT compute a mixture of LoRA experts with a Python loop over
the experts, each expert on every token, weighted by its (mostly zero) gate; HydraLoRA, whose
layout is MoSLD's (one shared A, one B per expert), even recomputes the shared ``A x`` inside the
loop, once per expert. Like those implementations (built on peft's LoRA layer), the input is
cast to the adapter weights' dtype first. This module is the benchmark's reference for "how it
is usually done"; it computes the same function as ``mosld.MoSLDLinear`` with ``share="A"``
(up to the DropConnect mask's random draw) and is not part of the package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mosld.adapters.inject import find_target_modules, layer_index, num_decoder_layers


class LoopMoSLDLinear(nn.Module):
    """A frozen linear layer plus MoSLD experts computed one at a time.

    Args:
        base_layer: The frozen projection (``nn.Linear``).
        r: Rank of each expert.
        alpha: Scaling numerator (output scaled by ``alpha / r``).
        num_experts: Experts of this layer (>= 2).
        top_k: Experts kept per token.
        shared_dropout: DropConnect probability on the shared A (training only).
        dtype: Dtype of the adapter and router weights.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        num_experts: int,
        top_k: int,
        shared_dropout: float,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.scaling = alpha / r
        self.top_k = top_k
        self.shared_dropout = shared_dropout
        self.lora_A = nn.Linear(d_in, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.ModuleList(
            nn.Linear(r, d_out, bias=False, device=device, dtype=dtype) for _ in range(num_experts)
        )
        self.lora_router = nn.Linear(d_in, num_experts, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_router.weight, a=math.sqrt(5))
        for b in self.lora_B:
            nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        result_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        probs = torch.softmax(self.lora_router(x), dim=-1, dtype=torch.float32)
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_vals / top_vals.sum(-1, keepdim=True)).to(x.dtype)
        weight_a = nn.functional.dropout(self.lora_A.weight, self.shared_dropout, self.training)
        for k, lora_b in enumerate(self.lora_B):
            # the shared A projection is recomputed for every expert, as in HydraLoRA
            result = result + lora_b(nn.functional.linear(x, weight_a)) * self.scaling * gates[..., k : k + 1]
        return result.to(result_dtype)


def inject_loop_mosld(
    model: nn.Module,
    target_modules: tuple[str, ...],
    num_experts: int | tuple[int, ...],
    r: int = 8,
    alpha: float = 16.0,
    top_k: int = 2,
    shared_dropout: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Freeze ``model`` and wrap its target projections in ``LoopMoSLDLinear`` (experts per layer as mosld's)."""
    from mosld import AdapterConfig

    experts = AdapterConfig(method="mosld", num_experts=num_experts).experts_per_layer(num_decoder_layers(model))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in find_target_modules(model, target_modules).items():
        parent_name, _, child = name.rpartition(".")
        layer = LoopMoSLDLinear(base, r, alpha, experts[layer_index(name)], top_k, shared_dropout, dtype)
        setattr(model.get_submodule(parent_name), child, layer)
    return model
