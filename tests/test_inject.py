"""Injection into causal LMs and the model-level helpers of mosld/adapters/inject.py:
parameter counts, routing statistics, the balancing loss, padding left out of both."""

from __future__ import annotations

import pytest
import torch
from helpers import adapted, first_layer, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import mosld


def test_trainable_parameter_counts_match_the_paper_on_llama2_7b():
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32)
    expected = {"lora": 4_194_304, "mola": 22_282_240, "mosld": 13_893_632}
    for method, count in expected.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        mosld.inject_adapters(model, mosld.AdapterConfig(method=method, r=8, num_experts=None))
        assert mosld.count_parameters(model)[0] == count, method
    assert expected["mosld"] / expected["mola"] == pytest.approx(0.62, abs=0.01)


def test_each_decoder_layer_gets_its_experts():
    model = adapted("llama", "mosld", num_experts=(2, 3, 4, 5))
    by_layer = {name.split(".")[2]: m.num_experts for name, m in mosld.adapter_layers(model).items()}
    assert by_layer == {"0": 2, "1": 3, "2": 4, "3": 5}


def test_unknown_target_module_is_refused_with_the_modules_it_has():
    with pytest.raises(ValueError, match="target_modules: 'qkv' matches no module.*q_proj"):
        mosld.inject_adapters(tiny_model(), mosld.AdapterConfig(target_modules=("qkv",), num_experts=2))


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


def test_router_stats_reset_after_reading_and_stop_when_switched_off():
    model = adapted("llama", "mosld", num_experts=4).train()
    mosld.set_router_stats(model, True)
    ids = torch.randint(0, 64, (2, 8))
    model(ids)
    assert mosld.router_stats(model)
    assert mosld.router_stats(model) == {}  # reset after reading
    mosld.set_router_stats(model, False)
    model(ids)
    assert mosld.router_stats(model) == {}


def test_aux_loss_is_at_least_one_and_reaches_the_router():
    model = adapted("llama", "mosld", num_experts=4).train()
    assert mosld.aux_loss(model) is None
    mosld.set_aux_loss(model, True)
    model(torch.randint(0, 64, (2, 8)))
    loss = mosld.aux_loss(model)
    loss.backward()
    assert loss.item() >= 1.0 - 1e-9
    assert first_layer(model).lora_router.weight.grad is not None


REAL = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # the second sequence: 5 tokens, 3 right-padding positions


def test_padding_is_left_out_of_router_stats():
    model = adapted("llama", "mosld", num_experts=4, top_k=2).eval()  # eval: no DropConnect noise
    mosld.set_router_stats(model, True)

    def stats_with_padding(pad_ids: list[int]) -> dict:
        ids = REAL.clone()
        ids[1, 5:] = torch.tensor(pad_ids)
        model(input_ids=ids, attention_mask=MASK)
        return mosld.router_stats(model)

    padded_a, padded_b = stats_with_padding([1, 2, 3]), stats_with_padding([60, 61, 62])
    model(input_ids=REAL[:1])  # the real tokens on their own: causal attention never looks at later padding
    model(input_ids=REAL[1:, :5])
    alone = mosld.router_stats(model)
    for name, s in padded_a.items():
        assert s["tokens"] == 13
        for key in ("mean_prob", "load", "entropy"):
            torch.testing.assert_close(s[key], padded_b[name][key])  # what sits in the padding does not count
            torch.testing.assert_close(s[key], alone[name][key])
    model(input_ids=REAL)  # without a mask every position counts
    assert next(iter(mosld.router_stats(model).values()))["tokens"] == 16


def test_no_mask_reaches_the_layers_once_stats_are_off():
    model = adapted("llama", "mosld", num_experts=4).eval()
    seen = []
    first_layer(model).register_forward_pre_hook(lambda layer, _args: seen.append(layer.token_mask))
    mosld.set_router_stats(model, True)
    model(input_ids=REAL, attention_mask=MASK)
    mosld.set_router_stats(model, False)
    model(input_ids=REAL, attention_mask=MASK)
    assert seen[0] is not None and seen[1] is None


def test_padding_is_left_out_of_the_balancing_loss():
    model = adapted("llama", "mosld", num_experts=4, top_k=2).train()
    mosld.set_aux_loss(model, True)
    losses = []
    for pad in (1, 62):
        torch.manual_seed(0)  # the same DropConnect masks
        model(input_ids=torch.where(MASK.bool(), REAL, pad), attention_mask=MASK)
        losses.append(mosld.aux_loss(model))
    torch.testing.assert_close(losses[0], losses[1])
