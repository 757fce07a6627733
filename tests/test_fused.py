"""The fused training path of ``MoSLDLinear`` (issue 5) against the plain autograd path."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import mosld
from mosld.adapters import MoSLDLinear

ARCHS = ["llama", "qwen2", "gpt2"]  # plain Linear (fused base product), Linear with bias, GPT-2 Conv1D
METHODS = ["lora", "mola", "mosl", "mosld", "share_b"]


def targets(arch: str) -> tuple[str, ...]:
    return ("c_attn", "c_fc") if arch == "gpt2" else ("q_proj", "v_proj", "up_proj")


def adapted(arch: str, method: str, dtype: torch.dtype = torch.float64, **kw) -> torch.nn.Module:
    kw.setdefault("num_experts", 1 if method == "lora" else (4, 3, 3, 2))
    kw.setdefault("adapter_dtype", "float64" if dtype == torch.float64 else "float32")
    cfg = mosld.AdapterConfig(method=method, r=4, alpha=8, target_modules=targets(arch), **kw)
    model = mosld.inject_adapters(tiny_model(arch, dtype=dtype), cfg).train()
    for layer in mosld.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return model


def run(model: torch.nn.Module, ids: torch.Tensor, fused: bool, monkeypatch, seed: int = 3):
    """Loss, logits and the adapter gradients of one training step on the chosen path."""
    for layer in mosld.adapter_layers(model).values():
        layer.fused = fused
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_path_equals_autograd_path_with_dropout(arch, method, monkeypatch):
    """Same seed, same DropConnect mask: loss, logits and every gradient agree in float64."""
    model = adapted(arch, method, shared_dropout=0.3)
    ids = torch.randint(0, 64, (2, 9))
    loss_f, logits_f, grads_f = run(model, ids, True, monkeypatch)
    loss_a, logits_a, grads_a = run(model, ids, False, monkeypatch)
    torch.testing.assert_close(logits_f, logits_a, atol=1e-10, rtol=0)
    torch.testing.assert_close(loss_f, loss_a, atol=1e-12, rtol=0)
    assert grads_f.keys() == grads_a.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_a[name], atol=1e-10, rtol=1e-9, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_fused_backward_passes_gradcheck(method):
    """The hand-written backward against finite differences, for x and every adapter tensor."""
    model = adapted("qwen2", method, shared_dropout=0.0, lora_dropout=0.0)
    layer = next(iter(mosld.adapter_layers(model).values()))  # q_proj: a Linear with bias, fused base product
    assert layer._fused_path() and layer._can_fuse_base(layer.base_layer)
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, requires_grad=True)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    weights = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def f(x, *ws):
        return torch.func.functional_call(layer, dict(zip(names, ws, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *weights), eps=1e-6, atol=1e-7)


def test_input_dropout_on_plain_lora_matches_autograd_path(monkeypatch):
    model = adapted("llama", "lora", lora_dropout=0.5)
    ids = torch.randint(0, 64, (2, 9))
    loss_f, _, grads_f = run(model, ids, True, monkeypatch)
    loss_a, _, grads_a = run(model, ids, False, monkeypatch)
    torch.testing.assert_close(loss_f, loss_a, atol=1e-12, rtol=0)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_a[name], atol=1e-10, rtol=1e-9, msg=name)


def test_routed_layer_with_input_dropout_uses_the_autograd_path():
    layer = next(iter(mosld.adapter_layers(adapted("llama", "mosld", lora_dropout=0.1)).values()))
    assert not layer._fused_path()
    layer.eval()  # no dropout at evaluation: fused again
    assert layer._fused_path()


def test_no_input_gradient_when_the_input_needs_none():
    layer = next(iter(mosld.adapter_layers(adapted("llama", "mosld")).values()))
    x = torch.randn(5, layer.in_features, dtype=torch.float64)  # no requires_grad
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_router.weight.grad is not None


def test_bf16_base_with_fp32_adapters_computes_in_bf16_and_keeps_fp32_grads():
    model = adapted("llama", "mosld", dtype=torch.bfloat16)
    layer = next(iter(mosld.adapter_layers(model).values()))
    assert layer.compute_dtype(torch.bfloat16) == torch.bfloat16
    assert layer.compute_dtype(torch.float64) == torch.float32
    ids = torch.randint(0, 64, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_router.weight.grad.dtype == torch.float32

    # against the float64 computation of the same weights: bf16 rounding only
    ref = adapted("llama", "mosld")
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), ref(ids).logits, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("method", ["lora", "mosld"])
def test_cpu_autocast_matches_the_autograd_path(method, monkeypatch):
    model = adapted("llama", method, dtype=torch.float32, shared_dropout=0.0)
    ids = torch.randint(0, 64, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_f, logits_f, grads_f = run(model, ids, True, monkeypatch)
        loss_a, logits_a, grads_a = run(model, ids, False, monkeypatch)
    assert logits_f.dtype == torch.bfloat16
    torch.testing.assert_close(logits_f.float(), logits_a.float(), atol=0.05, rtol=0.02)
    for name in grads_f:
        assert grads_f[name].dtype == torch.float32
        torch.testing.assert_close(grads_f[name], grads_a[name], atol=0.05, rtol=0.05, msg=name)


def test_fused_base_product_skips_hooked_or_trainable_bases():
    model = adapted("llama", "mosld")
    layer = next(iter(mosld.adapter_layers(model).values()))
    assert layer._can_fuse_base(layer.base_layer)
    handle = layer.base_layer.register_forward_hook(lambda *_: None)
    assert not layer._can_fuse_base(layer.base_layer)
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert not layer._can_fuse_base(layer.base_layer)
    ids = torch.randint(0, 64, (2, 5))
    model(ids, labels=ids).loss.backward()  # the base weight now trains through the unfused path
    assert layer.base_layer.weight.grad is not None and layer.lora_A.grad is not None
