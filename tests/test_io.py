"""The adapter file format (mosld/adapters/io.py): bit-identical round trips, contents, mismatched bases."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_METHODS, ARCHS, adapted, tiny_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mosld
from mosld.adapters import is_adapter_parameter


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
    model = adapted("llama", "mosld")
    mosld.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(is_adapter_parameter(k) for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == mosld.count_parameters(model)[0]


def test_loading_onto_a_mismatched_base_says_what_differs(tmp_path):
    mosld.save_adapter(adapted("llama", "mosld"), tmp_path)
    wider = tiny_config("llama")
    wider.hidden_size, wider.num_hidden_layers = 48, 3
    with pytest.raises(ValueError, match=r"hidden_size: adapter expects 32, base model has 48[\s\S]*num_hidden_layers"):
        mosld.load_adapter(AutoModelForCausalLM.from_config(wider), tmp_path)


def test_loading_onto_another_architecture_is_refused(tmp_path):
    mosld.save_adapter(adapted("llama", "mosld"), tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        mosld.load_adapter(tiny_model("qwen2"), tmp_path)
