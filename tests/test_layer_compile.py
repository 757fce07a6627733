"""``MoSLDLinear`` under ``torch.compile`` (inductor, CPU): no graph breaks, same numbers as eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mosld.adapters import MoSLDLinear


def layer_and_input(share: str | None, num_experts: int, shared_dropout: float) -> tuple[MoSLDLinear, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=False).requires_grad_(False)
    layer = MoSLDLinear(base, r=4, alpha=8, num_experts=num_experts, top_k=min(2, num_experts), share=share)
    layer.shared_dropout = shared_dropout
    nn.init.normal_(layer.lora_B, std=0.5)
    return layer, torch.randn(2, 5, 24)


def grads(layer: nn.Module, fn, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("share,num_experts", [("A", 4), (None, 1)], ids=["mosl", "lora"])
def test_compiled_training_step_matches_eager(share, num_experts):
    layer, x = layer_and_input(share, num_experts, shared_dropout=0.0)
    layer.train()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)  # fullgraph: a graph break would raise
    out_e, grads_e = grads(layer, layer, x)
    out_c, grads_c = grads(layer, compiled, x)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_compiled_under_cpu_autocast_matches_eager():
    layer, x = layer_and_input("A", 4, shared_dropout=0.0)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_e, grads_e = grads(layer, layer, x)
        out_c, grads_c = grads(layer, compiled, x)
    assert out_c.dtype == out_e.dtype == torch.bfloat16
    torch.testing.assert_close(out_c, out_e, atol=2e-2, rtol=2e-2)
    for name, g in grads_e.items():
        # inductor keeps fused elementwise intermediates in fp32 where eager rounds them to bf16
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_c[name], g, atol=1e-2 * scale, rtol=2e-2, msg=name)


def test_compiled_dropconnect_trains_and_is_exact_at_evaluation():
    layer, x = layer_and_input("A", 4, shared_dropout=0.5)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    layer.train()
    out, g = grads(layer, compiled, x)  # the mask is drawn by inductor's RNG: only check it ran
    assert torch.isfinite(out).all() and g["lora_A"].abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
