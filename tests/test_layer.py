"""``MoSLDLinear`` (mosld/adapters/layer.py): the mixture against a per-expert loop, DropConnect,
gradients, dtypes and merging."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_METHODS, ARCHS, adapted, first_layer, targets, tiny_model

import mosld
from mosld.adapters import MoSLDLinear, is_adapter_parameter
from mosld.adapters.mixture import topk_gates


def reference_delta(layer: MoSLDLinear, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula, one expert at a time: (alpha/r) sum_k g_k B_k (A_k x)."""
    x = x.reshape(-1, layer.in_features)
    r, n = layer.r, layer.num_experts
    a_blocks = [layer.lora_A[(0 if layer.num_a == 1 else k) * r :][:r] for k in range(n)]
    b_blocks = [layer.lora_B[:, (0 if layer.num_b == 1 else k) * r :][:, :r] for k in range(n)]
    if layer.lora_router is None:
        gates = torch.ones(x.shape[0], 1, dtype=x.dtype)
    else:
        gates = topk_gates(x @ layer.lora_router.weight.t(), layer.top_k)
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype)
    for t in range(x.shape[0]):
        for k in range(n):
            if gates[t, k] != 0:
                out[t] += gates[t, k] * (b_blocks[k] @ (a_blocks[k] @ x[t]))
    return layer.scaling * out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_stacked_forward_equals_per_expert_loop(arch, method):
    model = adapted(arch, method)
    for name, layer in mosld.adapter_layers(model).items():
        x = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
        got = layer.adapter_delta(x).reshape(-1, layer.out_features)
        assert (got - reference_delta(layer, x)).abs().max() < 1e-10, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_output_equals_base_model_at_init(arch, method):
    base = tiny_model(arch)
    ids = torch.randint(0, 64, (2, 7))
    expected = base(ids).logits
    cfg = mosld.AdapterConfig(
        method=method, r=4, target_modules=targets(arch), num_experts=1 if method == "lora" else 3
    )
    model = mosld.inject_adapters(base, cfg).train()
    assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("method", ["mosld", "share_b"])
def test_eval_mode_is_deterministic_and_training_is_not(method):
    model = adapted("llama", method, shared_dropout=0.5)
    ids = torch.randint(0, 64, (2, 7))
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method,masked,clean", [("mosld", "lora_A", "lora_B"), ("share_b", "lora_B", "lora_A")])
def test_only_the_shared_matrix_is_masked(method, masked, clean):
    layer = first_layer(adapted("llama", method, shared_dropout=0.5))
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    layer.train()
    # Zeroing elements of the shared matrix must reproduce the training output for the mask the
    # same seed draws, with the other matrix untouched.
    torch.manual_seed(1)
    out_train = layer.adapter_delta(x)
    torch.manual_seed(1)
    weight = getattr(layer, masked)
    mask = torch.empty_like(weight).bernoulli_(0.5)
    with torch.no_grad():
        original = weight.clone()
        weight.mul_(mask / 0.5)
        layer.eval()
        out_masked = layer.adapter_delta(x)
        weight.copy_(original)
    torch.testing.assert_close(out_train, out_masked, atol=1e-12, rtol=0)
    assert getattr(layer, clean).requires_grad


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_gradients_reach_adapters_and_router_and_nothing_in_the_base(arch, method):
    model = adapted(arch, method).train()
    ids = torch.randint(0, 64, (2, 9))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if is_adapter_parameter(name):
            assert p.requires_grad and p.grad is not None, name
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
        else:
            assert not p.requires_grad and p.grad is None, name


def test_every_expert_tensor_is_in_the_graph_even_when_unselected():
    """Top-k by masking: all tensors get a (possibly zero) gradient, so DDP needs no find_unused_parameters."""
    model = adapted("llama", "mola", num_experts=4, top_k=1).train()
    ids = torch.randint(0, 64, (1, 2))  # 2 tokens cannot select all 4 experts
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_layer_passes_gradcheck(method):
    """The layer's gradients against finite differences, for x and every adapter tensor (Linear with bias)."""
    layer = first_layer(adapted("qwen2", method, shared_dropout=0.0))
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, requires_grad=True)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    weights = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def f(x, *ws):
        return torch.func.functional_call(layer, dict(zip(names, ws, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *weights), eps=1e-6, atol=1e-7)


def test_no_input_gradient_when_the_input_needs_none():
    layer = first_layer(adapted("llama", "mosld"))
    x = torch.randn(5, layer.in_features, dtype=torch.float64)  # no requires_grad
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_router.weight.grad is not None


def test_fp32_adapters_on_a_bf16_base_compute_in_bf16_and_keep_fp32_grads():
    model = adapted("llama", "mosld", dtype=torch.bfloat16).train()
    layer = first_layer(model)
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.compute_dtype(torch.bfloat16) == torch.bfloat16
    assert layer.compute_dtype(torch.float64) == torch.float32
    ids = torch.randint(0, 64, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for p in (layer.lora_A, layer.lora_B, layer.lora_router.weight):
        assert p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


def test_bf16_base_output_is_the_float64_output_up_to_bf16_rounding():
    model = adapted("llama", "mosld", dtype=torch.bfloat16).eval()
    ref = adapted("llama", "mosld").eval()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), ref(ids).logits, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("method", ["lora", "mosld"])
def test_cpu_autocast_output_and_grads_are_the_fp32_ones_up_to_bf16_rounding(method):
    model = adapted("llama", method, dtype=torch.float32, shared_dropout=0.0).train()
    ids = torch.randint(0, 64, (2, 9))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_bf16, grads_bf16 = step()
    assert logits_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(logits_bf16.float(), logits, atol=0.05, rtol=0.02)
    for name, g in grads.items():
        assert grads_bf16[name].dtype == torch.float32
        # bf16 through the whole model: a few per cent of the gradient's norm (measured <= 5.3%)
        assert (grads_bf16[name] - g).norm() < 0.1 * g.norm(), name


def test_lora_merge_keeps_the_output():
    model = adapted("llama", "lora")
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids).logits
    original = first_layer(model).base_layer.weight.clone()
    mosld.merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-10, rtol=0)
    assert not torch.equal(first_layer(model).base_layer.weight, original)


def test_lora_unmerge_restores_the_base_weight_exactly():
    model = adapted("llama", "lora")
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids).logits
    originals = {n: m.base_layer.weight.clone() for n, m in mosld.adapter_layers(model).items()}
    mosld.unmerge_adapters(mosld.merge_adapters(model))
    for name, layer in mosld.adapter_layers(model).items():
        assert torch.equal(layer.base_layer.weight, originals[name])
    assert torch.equal(model(ids).logits, expected)


def test_lora_merge_on_gpt2_conv1d():
    model = adapted("gpt2", "lora")
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids).logits
    mosld.merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-10, rtol=0)


def test_merging_a_routed_mixture_is_refused():
    with pytest.raises(RuntimeError, match="depend on each token's input"):
        mosld.merge_adapters(adapted("llama", "mosld"))
