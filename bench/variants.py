"""The model shapes and adapter variants the benchmarks build (one randomly initialised causal LM each).

Variants: ``floor`` (frozen base, one trainable scalar on the input embeddings: what every
adapter costs on top of), ``peft_d0`` / ``peft_d05`` (peft LoRA r = 8, lora_dropout 0 / 0.05),
this project's ``lora``, ``mola``, ``mosl``, ``mosld``, ``mosld_bf16w`` (bf16 adapter weights), and
``loop_mosld`` (MoSLD computed with a Python loop over experts, as published mixture-of-LoRA code
does; ``bench/loop_reference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import mosld
from bench.loop_reference import inject_loop_mosld

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("floor", "peft_d0", "peft_d05", "lora", "mola", "mosl", "mosld", "loop_mosld")
# A diagnostic for the GPU suite: mosld with bf16 adapter weights (what fp32 master weights cost in casts).
EXTRA_VARIANTS = ("mosld_bf16w",)
COMPILED_VARIANTS = ("peft_d05", "mosld", "floor", "peft_d0")  # the compiled phase's subset, most important first
LABELS = {
    "floor": "frozen base + 1 scalar (floor)",
    "peft_d0": "peft LoRA r=8, dropout 0",
    "peft_d05": "peft LoRA r=8, dropout 0.05",
    "lora": "mosld `lora`",
    "mola": "mosld `mola`",
    "mosl": "mosld `mosl`",
    "mosld": "mosld `mosld`",
    "loop_mosld": "loop-over-experts MoSLD (reference)",
    "mosld_bf16w": "mosld `mosld`, bf16 adapter weights",
}


@dataclass(frozen=True)
class Shape:
    """A model shape and the adapter layout the benchmark uses on it."""

    name: str
    config: dict
    targets: tuple[str, ...]
    experts: int | tuple[int, ...]
    cpu_tokens: tuple[int, int]  # (batch, sequence length) defaults
    gpu_tokens: tuple[int, int]


SHAPES = {
    # SmolLM2-135M with the paper's adapter config: q and v, experts 8/6/4/2 by depth quartile.
    "smollm2": Shape(
        "smollm2",
        dict(
            hidden_size=576,
            num_hidden_layers=30,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
        ("q_proj", "v_proj"),
        (8, 6, 4, 2),
        (2, 256),
        (4, 1024),
    ),
    # Llama-shaped (TinyLlama's widths), 8 layers, adapters on all seven projections, 8 experts.
    "llama2k": Shape(
        "llama2k",
        dict(
            hidden_size=2048,
            num_hidden_layers=8,
            intermediate_size=5632,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
        ),
        ALL_PROJECTIONS,
        8,
        (1, 256),
        (4, 1024),
    ),
    # A few-layer model to exercise every code path (the GPU suite included) on a CPU in seconds.
    "tiny": Shape(
        "tiny",
        dict(
            hidden_size=64,
            num_hidden_layers=4,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            tie_word_embeddings=True,
            max_position_embeddings=256,
        ),
        ALL_PROJECTIONS,
        (4, 3, 3, 2),
        (2, 32),
        (2, 32),
    ),
}


def build_base(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape.config, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def apply_variant(model: nn.Module, variant: str, shape: Shape, targets: tuple[str, ...]) -> nn.Module:
    """Turn the freshly built base into ``variant`` (in place where possible); returns the model to train."""
    r, alpha, top_k = 8, 16.0, 2
    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        # On the input embeddings, so the backward pass runs through every layer as an adapter's does.
        model.floor_scale = nn.Parameter(torch.ones((), device=model.device))
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * model.floor_scale.to(out.dtype))
        return model
    if variant in ("peft_d0", "peft_d05"):
        import peft

        config = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0 if variant == "peft_d0" else 0.05,
            target_modules=list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return peft.get_peft_model(model, config)  # adapter weights in fp32 (autocast_adapter_dtype)
    if variant == "loop_mosld":
        return inject_loop_mosld(model, targets, shape.experts, r=r, alpha=alpha, top_k=top_k, shared_dropout=0.1)
    method = variant.removesuffix("_bf16w")
    config = mosld.AdapterConfig(
        method=method,
        r=r,
        alpha=alpha,
        target_modules=targets,
        num_experts=1 if method == "lora" else shape.experts,
        top_k=1 if method == "lora" else top_k,
        adapter_dtype="bfloat16" if variant.endswith("_bf16w") else "float32",
    )
    return mosld.inject_adapters(model, config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (what the compiled phase compiles one by one)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers"):
            return module
    raise ValueError("no decoder layer list found")


def targets_for(spec: str | None, shape: Shape) -> tuple[str, ...]:
    """``--targets`` (``q,v``, ``all`` or None for the shape's own) as projection names."""
    if spec is None:
        return shape.targets
    if spec == "all":
        return ALL_PROJECTIONS
    return tuple(t if t.endswith("_proj") else f"{t}_proj" for t in spec.split(","))
