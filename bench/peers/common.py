"""What both sides of the peer benchmark share: the Llama base built from one weights file, and a variant.

This module runs in the project's environment and in the peer's (``bench/peers/.venv``: MoE-PEFT
with transformers 4.46), so it imports only torch, transformers, safetensors and ``bench.memory``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# The adapter hyperparameters every variant on both sides uses. The dropout is MoE-PEFT's floor:
# its LoRA refuses a dropout of 0 (moe_peft/common/lora_linear.py, Lora.__init__ and
# LoraFunction.forward: ``assert ... dropout > 0``), so every side gets 0.05.
R, ALPHA, LORA_DROPOUT, EXPERTS, TOP_K = 8, 16, 0.05, 8, 2
QV = ("q_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def build_llama(config: dict, weights: str, dtype: torch.dtype, device: torch.device, attn: str = "eager") -> nn.Module:
    """A frozen ``LlamaForCausalLM`` of ``config`` with the weights of the safetensors file ``weights``.

    Built the same way by transformers 5 (project) and 4.46 (peer), so that both sides start from
    identical weights; the config is given explicitly because 4.46 cannot read a 5.x config.json.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(**config, use_cache=False)
    llama_config._attn_implementation = attn
    with torch.device(device):
        model = LlamaForCausalLM(llama_config)
    state = load_file(weights, device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{weights}: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.to(dtype)
    model.requires_grad_(False)
    return model.train()


@dataclass
class Variant:
    """One side's model + adapter + optimizer, as the worker drives it.

    ``train_step`` runs forward, backward, AdamW and ``zero_grad`` on a batch; ``forward`` one
    evaluation forward (no graph, the side's evaluation mode); ``resident`` counts the bytes kept
    between steps (weights, adapter, optimizer state; storages once); ``parameters`` are the
    trainable tensors; ``held`` returns every tensor the model keeps between steps (frozen weights,
    adapters, buffers). Both are left out of the saved-activation count, as ``bench.memory``
    leaves out a model's parameters: what remains is the activation memory.
    """

    name: str
    label: str
    parameters: list[torch.Tensor]
    train_step: Callable[[torch.Tensor], None]
    forward: Callable[[torch.Tensor], None]
    resident: Callable[[], int]
    held: Callable[[], list[torch.Tensor]]
    extra: dict = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.parameters)


def adamw(parameters: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer of every variant on both sides (as ``bench.runner``: lr 1e-4, ``foreach``)."""
    return torch.optim.AdamW(parameters, lr=1e-4, foreach=True)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (meta tensors excluded)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(measure, wall) seconds of ``fn``: wall clock on a GPU; on a CPU the process's CPU time.

    As in ``bench.runner.timed_step``: each worker runs one torch thread, so on an idle core CPU
    time equals wall time, and on a shared machine it leaves out the time others get.
    """
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return (wall if device.type == "cuda" else cpu), wall
