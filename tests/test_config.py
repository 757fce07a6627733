"""``AdapterConfig`` (mosld/adapters/config.py): method defaults, experts per layer, validation."""

from __future__ import annotations

import pytest

import mosld


def test_experts_per_layer_int_groups_and_per_layer_lists():
    cfg = mosld.AdapterConfig(num_experts=(8, 6, 4, 2))
    assert cfg.experts_per_layer(32) == [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8
    assert cfg.experts_per_layer(30) == [8] * 8 + [6] * 8 + [4] * 7 + [2] * 7
    assert mosld.AdapterConfig(num_experts=(2, 3, 4, 5)).experts_per_layer(4) == [2, 3, 4, 5]
    assert mosld.AdapterConfig(num_experts=3).experts_per_layer(2) == [3, 3]
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


def test_method_defaults():
    assert mosld.AdapterConfig(method="mosld").share == "A" and mosld.AdapterConfig().shared_dropout == 0.1
    assert mosld.AdapterConfig(method="mosl").shared_dropout == 0.0
    assert mosld.AdapterConfig(method="mola").share is None
    assert mosld.AdapterConfig(method="share_b").share == "B"


def test_explicit_fields_override_the_method_defaults():
    cfg = mosld.AdapterConfig(method="mosld", shared_dropout=0.3, top_k=1, num_experts=4)
    assert (cfg.shared_dropout, cfg.top_k, cfg.num_experts) == (0.3, 1, 4)
