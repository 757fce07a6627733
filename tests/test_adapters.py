"""The adapter layer, its injection and its file format (issue 2)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import mosld
from mosld.adapters import MoSLDLinear, is_adapter_parameter
from mosld.adapters.mixture import dropconnect, load_balancing_loss, routing_probs, topk_gates

ARCHS = ["llama", "qwen2", "gpt2"]
ROUTED = ["mola", "mosl", "mosld", "share_b"]
ALL_METHODS = ["lora", *ROUTED]


def targets(arch: str) -> tuple[str, ...]:
    return ("c_attn", "c_fc") if arch == "gpt2" else ("q_proj", "v_proj", "up_proj")


def adapted(arch: str, method: str, **kw) -> torch.nn.Module:
    experts = kw.pop("num_experts", 1 if method == "lora" else (4, 3, 3, 2))
    kw.setdefault("adapter_dtype", "float64")
    cfg = mosld.AdapterConfig(method=method, r=4, alpha=8, target_modules=targets(arch), num_experts=experts, **kw)
    model = mosld.inject_adapters(tiny_model(arch), cfg)
    for layer in mosld.adapter_layers(model).values():  # non-zero B so the adapters matter
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return model


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
def test_fused_forward_equals_per_expert_loop(arch, method):
    model = adapted(arch, method)
    for name, layer in mosld.adapter_layers(model).items():
        x = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
        got = layer.adapter_delta(x).reshape(-1, layer.out_features)
        assert (got - reference_delta(layer, x)).abs().max() < 1e-10, name


@pytest.mark.parametrize("method", ROUTED)
def test_gates_have_exactly_k_nonzeros_summing_to_one(method):
    layer = next(iter(mosld.adapter_layers(adapted("llama", method, top_k=2)).values()))
    logits = torch.randn(200, layer.num_experts, dtype=torch.float64)
    probs, gates = routing_probs(logits), topk_gates(logits, 2)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(200, dtype=gates.dtype))
    torch.testing.assert_close(probs.sum(-1), torch.ones(200, dtype=probs.dtype))
    # the kept experts are the two most probable ones
    assert ((gates > 0) == (probs >= probs.topk(2).values[:, -1:])).all()


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


def test_dropconnect_is_unbiased_and_drops_with_probability_p():
    weight = torch.randn(8, 16, dtype=torch.float64)
    torch.manual_seed(0)
    draws = torch.stack([dropconnect(weight, 0.1) for _ in range(4000)])
    kept = (draws != 0).double().mean()
    assert abs(kept.item() - 0.9) < 0.005
    torch.testing.assert_close(draws.mean(0), weight, atol=0.05, rtol=0)
    assert torch.allclose(draws[0][draws[0] != 0], weight[draws[0] != 0] / 0.9)


@pytest.mark.parametrize("method,masked,clean", [("mosld", "lora_A", "lora_B"), ("share_b", "lora_B", "lora_A")])
def test_only_the_shared_matrix_is_masked(method, masked, clean):
    model = adapted("llama", method, shared_dropout=0.5)
    layer = next(iter(mosld.adapter_layers(model).values()))
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    layer.train()
    # Compare the dropped-out forward with explicit masks: zeroing elements of the shared
    # matrix must reproduce the training output for some mask, the other matrix untouched.
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


def test_trainable_parameter_counts_match_the_paper_on_llama2_7b():
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32)
    expected = {"lora": 4_194_304, "mola": 22_282_240, "mosld": 13_893_632}
    for method, count in expected.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        mosld.inject_adapters(model, mosld.AdapterConfig(method=method, r=8, num_experts=None))
        assert mosld.count_parameters(model)[0] == count, method
    assert expected["mosld"] / expected["mola"] == pytest.approx(0.62, abs=0.01)


def test_experts_per_layer_int_groups_and_per_layer_lists():
    cfg = mosld.AdapterConfig(num_experts=(8, 6, 4, 2))
    assert cfg.experts_per_layer(32) == [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8
    assert cfg.experts_per_layer(30) == [8] * 8 + [6] * 8 + [4] * 7 + [2] * 7
    assert mosld.AdapterConfig(num_experts=(2, 3, 4, 5)).experts_per_layer(4) == [2, 3, 4, 5]
    model = adapted("llama", "mosld", num_experts=(2, 3, 4, 5))
    by_layer = {name.split(".")[2]: m.num_experts for name, m in mosld.adapter_layers(model).items()}
    assert by_layer == {"0": 2, "1": 3, "2": 4, "3": 5}
    with pytest.raises(ValueError, match="num_experts"):
        mosld.AdapterConfig(num_experts=(2,) * 5).experts_per_layer(4)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"top_k": 3, "num_experts": 2}, "top_k"),
        ({"method": "moe"}, "method"),
        ({"shared_dropout": 1.0}, "shared_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"method": "lora", "num_experts": 4}, "num_experts"),
        ({"share": "C"}, "share"),
        ({"adapter_dtype": "int8"}, "adapter_dtype"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        mosld.AdapterConfig(**kwargs)


def test_unknown_target_module_is_refused_with_the_modules_it_has():
    with pytest.raises(ValueError, match="target_modules: 'qkv' matches no module.*q_proj"):
        mosld.inject_adapters(tiny_model(), mosld.AdapterConfig(target_modules=("qkv",), num_experts=2))


def test_method_defaults_and_explicit_overrides():
    assert mosld.AdapterConfig(method="mosld").share == "A" and mosld.AdapterConfig().shared_dropout == 0.1
    assert mosld.AdapterConfig(method="mosl").shared_dropout == 0.0
    assert mosld.AdapterConfig(method="mola").share is None
    assert mosld.AdapterConfig(method="share_b").share == "B"
    cfg = mosld.AdapterConfig(method="mosld", shared_dropout=0.3, top_k=1, num_experts=4)
    assert (cfg.shared_dropout, cfg.top_k, cfg.num_experts) == (0.3, 1, 4)


def test_fp32_adapters_on_a_bf16_base():
    base = tiny_model("llama", dtype=torch.bfloat16)
    model = mosld.inject_adapters(base, mosld.AdapterConfig(num_experts=2, adapter_dtype="float32")).train()
    layer = next(iter(mosld.adapter_layers(model).values()))
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 6))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_load_round_trip_is_bit_identical(arch, method, tmp_path):
    model = adapted(arch, method)
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids).logits
    mosld.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = mosld.load_adapter(tiny_model(arch), tmp_path / "adapter")
    assert torch.equal(reloaded(ids).logits, expected)
    assert set(mosld.adapter_state_dict(reloaded)) == set(mosld.adapter_state_dict(model))


def test_adapter_file_holds_only_adapter_tensors(tmp_path):
    from safetensors.torch import load_file

    model = adapted("llama", "mosld")
    mosld.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(is_adapter_parameter(k) for k in keys)
    assert (
        sum(load_file(tmp_path / "adapter_model.safetensors")[k].numel() for k in keys)
        == mosld.count_parameters(model)[0]
    )


def test_loading_onto_a_mismatched_base_says_what_differs(tmp_path):
    from conftest import tiny_config

    mosld.save_adapter(adapted("llama", "mosld"), tmp_path)
    wider = tiny_config("llama")
    wider.hidden_size, wider.num_hidden_layers = 48, 3
    with pytest.raises(ValueError, match=r"hidden_size: adapter expects 32, base model has 48[\s\S]*num_hidden_layers"):
        mosld.load_adapter(AutoModelForCausalLM.from_config(wider), tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        mosld.load_adapter(tiny_model("qwen2"), tmp_path)


def test_lora_merge_and_unmerge_restore_the_base_weight():
    model = adapted("llama", "lora")
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids).logits
    originals = {n: m.base_layer.weight.clone() for n, m in mosld.adapter_layers(model).items()}
    mosld.merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-10, rtol=0)
    assert not torch.equal(
        next(iter(mosld.adapter_layers(model).values())).base_layer.weight, next(iter(originals.values()))
    )
    mosld.unmerge_adapters(model)
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


def test_router_stats_are_detached_and_describe_the_routing():
    model = adapted("llama", "mosld", num_experts=4, top_k=2).train()
    mosld.set_router_stats(model, True)
    ids = torch.randint(0, 64, (2, 8))
    model(ids)
    stats = mosld.router_stats(model)
    assert len(stats) == len(mosld.adapter_layers(model))
    for s in stats.values():
        assert not s["mean_prob"].requires_grad and s["mean_prob"].grad_fn is None
        torch.testing.assert_close(s["mean_prob"].sum(), torch.tensor(1.0))
        torch.testing.assert_close(s["load"].sum(), torch.tensor(2.0))  # each token selects top_k=2
        assert 0 < s["entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6
        assert s["tokens"] == 16
    assert mosld.router_stats(model) == {}  # reset after reading
    mosld.set_router_stats(model, False)
    model(ids)
    assert mosld.router_stats(model) == {}


def test_aux_loss_is_one_when_balanced_and_differentiable():
    layer = next(iter(mosld.adapter_layers(adapted("llama", "mosld", num_experts=4, top_k=1)).values()))
    probs = torch.full((8, 4), 0.25, dtype=torch.float64, requires_grad=True)
    gates = torch.eye(4, dtype=torch.float64).repeat(2, 1)
    loss = load_balancing_loss(probs, gates, top_k=1)
    assert loss.item() == pytest.approx(1.0)
    skewed = torch.tensor([[1.0, 0, 0, 0]] * 8, dtype=torch.float64)
    assert load_balancing_loss(skewed, skewed, top_k=1).item() == pytest.approx(4.0)
    model = adapted("llama", "mosld", num_experts=4).train()
    assert mosld.aux_loss(model) is None
    mosld.set_aux_loss(model, True)
    ids = torch.randint(0, 64, (2, 8))
    model(ids)
    loss = mosld.aux_loss(model)
    loss.backward()
    assert loss.item() >= 1.0 - 1e-9
    assert next(iter(mosld.adapter_layers(model).values())).lora_router.weight.grad is not None


def test_padding_is_left_out_of_router_stats_and_the_balancing_loss():
    model = adapted("llama", "mosld", num_experts=4, top_k=2).eval()  # eval: no DropConnect noise
    mosld.set_router_stats(model, True)
    real = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # the second sequence is 5 tokens and 3 right-padding positions

    def stats_with_padding(pad_ids: torch.Tensor) -> dict:
        ids = real.clone()
        ids[1, 5:] = pad_ids
        model(input_ids=ids, attention_mask=mask)
        return mosld.router_stats(model)

    padded_a, padded_b = stats_with_padding(torch.tensor([1, 2, 3])), stats_with_padding(torch.tensor([60, 61, 62]))
    model(input_ids=real[:1])  # the real tokens on their own: causal attention never looks at later padding
    model(input_ids=real[1:, :5])
    alone = mosld.router_stats(model)
    for name, s in padded_a.items():
        assert s["tokens"] == 13
        for key in ("mean_prob", "load", "entropy"):
            torch.testing.assert_close(s[key], padded_b[name][key])  # what sits in the padding does not count
            torch.testing.assert_close(s[key], alone[name][key])
    # without a mask every position counts (and the padding's content shows)
    model(input_ids=real)
    assert next(iter(mosld.router_stats(model).values()))["tokens"] == 16
    mosld.set_router_stats(model, False)
    assert model._forward_pre_hooks == {} and model._forward_hooks == {}  # nothing left on the hot path

    model.train()
    mosld.set_aux_loss(model, True)
    torch.manual_seed(0)
    model(input_ids=torch.where(mask.bool(), real, 1), attention_mask=mask)
    loss_a = mosld.aux_loss(model)
    torch.manual_seed(0)  # the same DropConnect masks
    model(input_ids=torch.where(mask.bool(), real, 62), attention_mask=mask)
    torch.testing.assert_close(loss_a, mosld.aux_loss(model))
