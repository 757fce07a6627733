"""The peer's side of the benchmark: MoE-PEFT 2.0.2's own Llama and adapters (runs in ``bench/peers/.venv``).

MoE-PEFT is driven the way its trainer drives it (``moe_peft/trainer.py``, ``train``): an
``LLMModel`` built from a transformers model (``moe_peft.models.from_pretrained``), one adapter
added with ``init_adapter``, a batch as ``LLMModelInput``, the loss from ``LLMModelOutput`` (plus
``aux_loss`` when the adapter has a router loss), the trainable tensors from
``get_adapter_weight_dict``. Each variant has its own base model: MoE-PEFT switches every projection
to its slower per-adapter path as soon as any adapter on it is a mixture
(``moe_peft/common/lora_linear.py``, ``Linear.forward``), so sharing one base would slow its LoRA.

Variants (r 8, alpha 16, LoRA dropout 0.05, fp32 adapter weights as MoE-PEFT always keeps them):

* ``floor``: MoE-PEFT's Llama without an adapter, one trainable scalar on the input embeddings.
* ``lora``: MoE-PEFT LoRA on q/v.
* ``mola``: MoE-PEFT MoLA on q/v, 8 experts, top-2 (routing strategy ``mola``).
* ``mixlora``: MoE-PEFT MixLoRA on gate/up/down, 8 experts, top-2 (routing strategy ``mixlora``:
  one router per MLP block, each expert the frozen MLP with its own LoRA on all three projections).

The balancing losses are off (``router_loss: false``) unless ``balance_loss`` is set: MoLA's is off
by default in MoE-PEFT and mosld's is; MixLoRA's default (on, coefficient 0.001) is kept with it.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.peers.common import ALPHA, EXPERTS, LORA_DROPOUT, MLP, QV, TOP_K, R, Variant, adamw, build_llama

LABELS = {
    "floor": "MoE-PEFT Llama, frozen + 1 scalar (floor)",
    "lora": "MoE-PEFT LoRA q/v",
    "mola": "MoE-PEFT MoLA q/v, 8 experts top-2",
    "mixlora": "MoE-PEFT MixLoRA gate/up/down, 8 experts top-2",
}


def adapter_kwargs(variant: str, balance_loss: bool) -> tuple[str, dict]:
    """(peft_type, config keys of MoE-PEFT's adapter_config.json) of ``variant``."""
    common = dict(r=R, lora_alpha=ALPHA, lora_dropout=LORA_DROPOUT)
    if variant == "lora":
        return "LORA", dict(common, target_modules=list(QV))
    routed = dict(num_experts=EXPERTS, top_k=TOP_K, router_loss=balance_loss)
    if variant == "mola":
        return "MOLA", dict(common, target_modules=list(QV), routing_strategy="mola", **routed)
    if variant == "mixlora":
        return "MIXLORA", dict(common, target_modules=list(MLP), routing_strategy="mixlora", **routed)
    raise ValueError(f"unknown MoE-PEFT-side variant {variant!r}; known: {', '.join(LABELS)}")


def build_llm(config: dict, weights: str, dtype: torch.dtype, device: torch.device):
    """MoE-PEFT's ``LLMModel`` over the shared base weights (eager attention: its only one off CUDA)."""
    from moe_peft.model import LLMModel
    from moe_peft.models import from_pretrained

    hf_model = build_llama(config, weights, dtype, device, "eager")
    return LLMModel(from_pretrained(hf_model, attn_impl="eager", use_sliding_window=False, device=str(device)))


def model_input(name: str, ids: torch.Tensor, labels: bool, inference: bool, masks: bool):
    from moe_peft.common import LLMBatchConfig, LLMModelInput

    return LLMModelInput(
        batch_configs_=[LLMBatchConfig(adapter_name_=name, batch_start_idx_=0, batch_end_idx_=ids.shape[0])],
        batch_tokens_=ids,
        batch_labels_=ids if labels else None,
        # the router losses index the attention mask (model.py, LLMModel.forward); as its trainer, all ones
        batch_masks_=torch.ones_like(ids) if masks else None,
        inference_mode_=inference,
    )


def reachable_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through MoE-PEFT's objects, dicts, lists and torch modules.

    MoE-PEFT keeps its layers and adapters in plain lists and dicts (``LLMModel`` is a module, its
    decoder layers and ``Linear.loras_`` are not registered), so ``parameters()`` sees none of them.
    """
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, nn.Module) or type(obj).__module__.startswith("moe_peft"):
            stack.extend(vars(obj).values())
    return found


def build(
    variant: str, config: dict, weights: str, dtype: torch.dtype, device: torch.device, balance_loss: bool = False
) -> Variant:
    import moe_peft
    from moe_peft.common import AdapterConfig

    llm = build_llm(config, weights, dtype, device)
    name = f"bench_{variant}"
    if variant == "floor":
        llm.init_adapter(AdapterConfig(adapter_name=name, task_name="casual"))
        scale = nn.Parameter(torch.ones((), device=device))
        embed = llm.model_.embed_tokens_
        unscaled = embed.forward
        embed.forward = lambda tokens: unscaled(tokens) * scale.to(embed.token_embedding_.dtype)
        parameters = [scale]
    else:
        peft_type, kwargs = adapter_kwargs(variant, balance_loss)
        llm.init_adapter(moe_peft.adapter_factory(peft_type, name, **kwargs))
        parameters = [t for t in llm.get_adapter_weight_dict(name).values() if t.requires_grad]
    optimizer = adamw(parameters)
    masks = balance_loss and variant != "floor"

    def train_step(ids: torch.Tensor) -> None:
        output = llm.forward(model_input(name, ids, labels=True, inference=False, masks=masks))[0]
        loss = output.loss if output.aux_loss is None else output.loss + output.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(ids: torch.Tensor) -> None:
        # as its evaluator (moe_peft/evaluator.py, inference_mode_ set), but under no_grad rather than its
        # torch.inference_mode: MoE-PEFT caches an index tensor module-wide (common/lora_linear.py,
        # get_range_tensor), and one first made in inference mode breaks every later training step
        with torch.no_grad():
            llm.forward(model_input(name, ids, labels=True, inference=True, masks=masks))

    def resident() -> int:
        from bench.peers.common import optimizer_tensors, storage_bytes

        return storage_bytes(reachable_tensors(llm) + parameters + optimizer_tensors(optimizer))

    return Variant(
        variant,
        LABELS[variant],
        parameters,
        train_step,
        forward,
        resident,
        lambda: reachable_tensors(llm),
        extra={"llm": llm, "adapter": name},
    )
