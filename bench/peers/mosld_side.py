"""The project's side of the peer benchmark: transformers' Llama with mosld's adapters, or peft's LoRA.

Variants (every adapter r 8, alpha 16, LoRA dropout 0.05, fp32 adapter weights, AdamW):

* ``floor``: the frozen base with one trainable scalar on the input embeddings (``bench.variants``).
* ``peft_lora``: peft LoRA on q/v.
* ``lora``: mosld ``lora`` on q/v.
* ``mola``: mosld ``mola`` on q/v, 8 experts in every layer, top-2 (MoE-PEFT's MoLA config).
* ``mola_mlp``: mosld ``mola`` on gate/up/down, 8 experts, top-2 (MixLoRA's targets and experts;
  a router per projection, where MixLoRA has one per MLP block).
* ``mosld_mlp``: mosld ``mosld`` (shared A, DropConnect 0.1) on gate/up/down, 8 experts, top-2.
* ``mosld``: mosld ``mosld`` on q/v, 8 experts, top-2 (not in the default set).
"""

from __future__ import annotations

import torch
from torch import nn

import mosld
from bench.memory import resident_bytes
from bench.peers.common import ALPHA, EXPERTS, LORA_DROPOUT, MLP, QV, TOP_K, R, Variant, adamw, build_llama

LABELS = {
    "floor": "transformers Llama, frozen + 1 scalar (floor)",
    "peft_lora": "peft LoRA q/v",
    "lora": "mosld `lora` q/v",
    "mola": "mosld `mola` q/v, 8 experts top-2",
    "mola_mlp": "mosld `mola` gate/up/down, 8 experts top-2",
    "mosld_mlp": "mosld `mosld` gate/up/down, 8 experts top-2",
    "mosld": "mosld `mosld` q/v, 8 experts top-2",
}
BALANCE_COEF = 0.001  # MoE-PEFT's default router_aux_loss_coef
ADAPTERS = {  # variant -> (method, targets)
    "lora": ("lora", QV),
    "mola": ("mola", QV),
    "mola_mlp": ("mola", MLP),
    "mosld_mlp": ("mosld", MLP),
    "mosld": ("mosld", QV),
}


def adapter_config(variant: str) -> mosld.AdapterConfig:
    method, targets = ADAPTERS[variant]
    return mosld.AdapterConfig(
        method=method,
        r=R,
        alpha=float(ALPHA),
        target_modules=targets,
        num_experts=1 if method == "lora" else EXPERTS,
        top_k=1 if method == "lora" else TOP_K,
        lora_dropout=LORA_DROPOUT,
    )


def apply(model: nn.Module, variant: str) -> nn.Module:
    """Turn the frozen base into ``variant``; returns the model to train."""
    if variant == "floor":
        return add_floor_scale(model)
    if variant == "peft_lora":
        import peft

        config = peft.LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=list(QV),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return peft.get_peft_model(model, config)
    if variant not in ADAPTERS:
        raise ValueError(f"unknown mosld-side variant {variant!r}; known: {', '.join(LABELS)}")
    return mosld.inject_adapters(model, adapter_config(variant))


def add_floor_scale(model: nn.Module) -> nn.Module:
    """``bench.variants``' floor: one trainable scalar on the input embeddings, so that backward runs
    through every layer as an adapter's does."""
    model.floor_scale = nn.Parameter(torch.ones((), device=model.device))
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * model.floor_scale.to(out.dtype))
    return model


def build(
    variant: str,
    config: dict,
    weights: str,
    dtype: torch.dtype,
    device: torch.device,
    attn: str = "eager",
    balance_loss: bool = False,
) -> Variant:
    model = apply(build_llama(config, weights, dtype, device, attn), variant)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(parameters)
    # MoE-PEFT's default coefficient, when the balancing loss is on (bench.peers.compare --balance-loss)
    balance = balance_loss and variant in ADAPTERS and ADAPTERS[variant][0] != "lora"
    if balance:
        mosld.set_aux_loss(model, True)

    def train_step(ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        if balance:
            loss = loss + BALANCE_COEF * mosld.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(ids: torch.Tensor) -> None:
        model.eval()
        with torch.no_grad():  # as the MoE-PEFT side (see there)
            model(input_ids=ids, labels=ids)
        model.train()

    return Variant(
        variant,
        LABELS[variant],
        parameters,
        train_step,
        forward,
        lambda: resident_bytes(model, optimizer),
        lambda: [*model.parameters(), *model.buffers()],
        extra={"model": model},
    )
