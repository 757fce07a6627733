"""Memory planner: the bytes one training step needs, predicted from the config without loading weights.

The configured base is built on the meta device (no weights read), the configured adapters are
injected there, and one forward of a ``batch x seq`` batch runs on meta under autograd's
saved-tensor hooks. The prediction is the sum of:

* **weights**: every frozen parameter and buffer at its dtype; with ``model.quantization`` every
  ``nn.Linear`` except the LM head is counted as bitsandbytes stores it (``quantized_linear_bytes``).
* **adapter**: the trainable tensors, their gradients and AdamW's two moments (each at the tensor's dtype).
* **activations**: the bytes autograd saves for backward (distinct storages, parameters excluded). With
  gradient checkpointing the forward keeps each decoder layer's input only, and the backward recomputes
  one layer at a time: the inputs plus the largest layer's saved bytes.
* **transient**: the answer-position logits in fp32 (logits, log-softmax, their gradient) and the
  backward's working set: the gradient flowing between layers (two hidden states), one MLP-wide gradient
  and, for a quantized base, one dequantized weight matrix.

Example::

    python -m mosld.tools.memory --config configs/paper/base.yaml --config configs/paper/mosld.yaml \\
        --model.quantization.bits 4 --model.gradient_checkpointing true --batch 4 --seq 1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from torch import nn

from ..adapters import AdapterConfig, inject_adapters
from ..adapters.inject import num_decoder_layers
from ..models import DTYPES, is_embedded, meta_model
from ..quantization import QuantizationConfig
from ..training.cli import read_config

# Architectures of hub models that are not available offline (``--model-config`` takes any config.json).
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}
KNOWN_ARCHITECTURES["meta-llama/Llama-2-7b-chat-hf"] = KNOWN_ARCHITECTURES["meta-llama/Llama-2-7b-hf"]
BLOCKSIZE, NESTED_BLOCKSIZE = 64, 256  # bitsandbytes' 4-bit blocks and double quantization's blocks of scales
MIB = 2**20


@dataclass
class Plan:
    """Predicted bytes of one training step, by part."""

    weights: int
    adapter_params: int
    adapter_grads: int
    optimizer: int
    activations: int
    transient: int
    trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def adapter(self) -> int:
        return self.adapter_params + self.adapter_grads + self.optimizer

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.transient

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*self.__dataclass_fields__, "adapter", "total")}


def quantized_linear_bytes(out_features: int, in_features: int, quantization: QuantizationConfig) -> int:
    """Bytes bitsandbytes keeps for one quantized weight matrix (bias not included).

    4-bit: two weights per byte, a 16-entry fp32 code, and per block of 64 weights one fp32 absmax, or
    with double quantization one uint8 absmax per block plus, per 256 blocks, one fp32 absmax (a 256-entry
    fp32 code and an fp32 offset per layer). 8-bit: one byte per weight and an fp32 scale per output row.
    """
    n = out_features * in_features
    if quantization.bits == 8:
        return n + 4 * out_features
    blocks = math.ceil(n / BLOCKSIZE)
    scales = (
        blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 256 * 4 + 4 if quantization.double_quant else 4 * blocks
    )
    return math.ceil(n / 2) + 16 * 4 + scales


def _storage_key(t: torch.Tensor) -> int:
    # On meta every data_ptr is 0; the storage object's address tells storages apart.
    return t.untyped_storage()._cdata


def _quantized_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears bitsandbytes quantizes: every frozen ``nn.Linear`` but the LM head."""
    output = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not output and not m.weight.requires_grad]


def weight_bytes(model: nn.Module, quantization: QuantizationConfig) -> int:
    """Frozen parameters and buffers at their dtype; quantized linears by ``quantized_linear_bytes``."""
    quantized: set[int] = set()
    total = 0
    if quantization.enabled:
        for module in _quantized_linears(model):
            quantized.add(_storage_key(module.weight))
            total += quantized_linear_bytes(module.out_features, module.in_features, quantization)
    seen = set(quantized)
    for t in [*model.parameters(), *model.buffers()]:
        key = _storage_key(t)
        if key in seen or t.requires_grad:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList with one entry per hidden layer)."""
    count = num_decoder_layers(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of its {count} decoder layers found")


@dataclass
class SavedBytes:
    """Bytes autograd saved in one forward: per decoder layer and outside the layers."""

    layers: list[int]
    outside: int
    held: int = 0  # inputs kept outside autograd's saved tensors (also counted in ``layers`` where not saved)


class _FusedAttention(torch.autograd.Function):
    """Attention as fused kernels save it for backward (PyTorch's CPU flash kernel, CUDA's flash and
    memory-efficient kernels): query, key, value (key/value heads not repeated), output and the fp32
    (batch, heads, seq) logsumexp; no (seq, seq) scores. Shapes only: it runs on meta."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never run: the planner only counts what forward saves
        raise NotImplementedError


def _fused_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _meta_forward() -> Iterator[None]:
    """A forward on meta that saves what the real one does.

    Meta's SDPA falls back to the math path, which saves (seq, seq) score tensors no fused kernel keeps:
    attention runs as ``_FusedAttention`` instead. Without an attention mask, transformers looks for
    packed sequences in the position ids, reading values meta tensors lack; the planned batch has no
    padding nor packing, so the check is skipped and the plain causal path taken.
    """
    from transformers import masking_utils
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    original = masking_utils.find_packed_sequence_indices, mapping["sdpa"]
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    mapping["sdpa"] = _fused_attention
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices, mapping["sdpa"] = original


def saved_bytes(
    model: nn.Module, batch: int, seq: int, answer_tokens: int, held_inputs: list[nn.Module] = ()
) -> SavedBytes:
    """Run one forward + loss on meta under saved-tensor hooks; attribute each new storage to its layer.

    ``held_inputs``: modules whose backward keeps their input outside autograd's saved tensors (counted too).
    """
    layers = decoder_layers(model)
    params = {_storage_key(p) for p in model.parameters()}
    seen: set[int] = set()
    per_layer = [0] * len(layers)
    current: list[int | None] = [None]
    counts = {"outside": 0}
    alive: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key in params or key in seen:
            return t
        seen.add(key)
        alive.append(t)  # a freed storage's address can come back for a new one: keep each counted one
        nbytes = t.untyped_storage().nbytes()
        if current[0] is None:
            counts["outside"] += nbytes
        else:
            per_layer[current[0]] += nbytes
        return t

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda *_: current.__setitem__(0, None)))

    held: dict[int, int] = {}

    def hold(module: nn.Module, args: tuple) -> None:
        pack(args[0])
        held[_storage_key(args[0])] = args[0].untyped_storage().nbytes()

    handles += [module.register_forward_pre_hook(hold) for module in held_inputs]
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    targets = torch.zeros(batch * answer_tokens, dtype=torch.long, device="meta")
    try:
        with _meta_forward(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids, logits_to_keep=answer_tokens).logits
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets)
        del loss, logits
    finally:
        for handle in handles:
            handle.remove()
    return SavedBytes(per_layer, counts["outside"], sum(held.values()))


def plan(
    model: nn.Module,
    quantization: QuantizationConfig,
    batch: int,
    seq: int,
    answer_tokens: int,
    checkpointing: bool,
) -> Plan:
    """Predict one training step's bytes for an adapted model on meta (see the module docstring)."""
    if answer_tokens < 1 or answer_tokens > seq:
        raise ValueError(f"answer_tokens: expected 1 to seq ({seq}), got {answer_tokens}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in trainable)
    # bitsandbytes' 8-bit matmul on a CPU keeps its input as ``ctx.A``, which saved-tensor hooks do not see
    held = _quantized_linears(model) if quantization.bits == 8 else []
    saved = saved_bytes(model, batch, seq, answer_tokens, held)
    notes = []
    layers = saved.layers
    config = model.config
    dtype_bytes = model.dtype.itemsize
    hidden = batch * seq * config.hidden_size * dtype_bytes
    if checkpointing:
        # Each layer's checkpoint keeps its input hidden state; backward recomputes one layer at a time.
        # Inputs held outside autograd's saved tensors escape checkpointing: all of them stay.
        activations = saved.outside + len(layers) * hidden + max(layers) + saved.held
        notes.append("checkpointing: layer inputs kept, one layer's activations recomputed at a time")
    else:
        activations = saved.outside + sum(layers)
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    logits = 3 * batch * answer_tokens * config.vocab_size * 4
    working = 2 * hidden + batch * seq * intermediate * dtype_bytes
    if quantization.enabled:  # each quantized matmul dequantizes its weight, one layer at a time
        working += max(m.weight.numel() for m in _quantized_linears(model)) * dtype_bytes
    return Plan(
        weights=weight_bytes(model, quantization),
        adapter_params=params,
        adapter_grads=params,
        optimizer=2 * params,
        activations=activations,
        transient=logits + working,
        trainable=sum(p.numel() for p in trainable),
        notes=notes,
    )


# ---------------------------------------------------------------------------- configs and the command line
def read_options(args: list[str]) -> dict:
    """The options a ``fit`` with these arguments (``--config`` files, ``--section.key`` overrides) runs with, read
    by the command line's own parser: its defaults, and what it refuses refused with its message."""
    try:
        return read_config(list(args)).as_dict()
    except ArgumentError as err:
        raise ValueError(str(err)) from None


def meta_base(name: str, dtype: torch.dtype, model_config: str | None = None) -> nn.Module:
    """The frozen base model on meta: from ``model_config`` (a config.json), the known table, or a local/embedded model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_config is not None:
        if not Path(model_config).is_file():
            raise ValueError(f"--model-config: {model_config} is not a file")
        config = AutoConfig.for_model(**json.loads(Path(model_config).read_text()))
    elif name in KNOWN_ARCHITECTURES:
        config = AutoConfig.for_model(**KNOWN_ARCHITECTURES[name])
    elif is_embedded(name) or Path(name).is_dir():
        return meta_model(name).to(dtype).requires_grad_(False)
    else:
        raise ValueError(
            f"model.model_name_or_path: {name!r} is neither local nor a known architecture "
            f"({', '.join(KNOWN_ARCHITECTURES)}); pass its config.json with --model-config"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).requires_grad_(False)


def plan_from_options(
    options: dict, batch: int, seq: int, answer_tokens: int, model_config: str | None = None
) -> tuple[Plan, dict]:
    """Build the configured model on meta, inject its adapters, predict; also returns what was planned."""
    model_options = options.get("model") or {}
    name = model_options.get("model_name_or_path", "embedded:smollm2-135m")
    dtype_name = model_options.get("dtype", "float32")
    quantization = QuantizationConfig.from_value(model_options.get("quantization"))
    adapter = AdapterConfig(**dict(model_options.get("adapter") or {}))
    checkpointing = bool(model_options.get("gradient_checkpointing", False))
    # bitsandbytes casts each quantized matmul's output back to its input's dtype: the activations
    # stay in model.dtype whatever the 4-bit compute dtype
    model = meta_base(name, DTYPES[dtype_name], model_config)
    model.config.use_cache = False
    with contextlib.suppress(AttributeError):
        model.config._attn_implementation = "sdpa"
    inject_adapters(model, adapter)
    model.train()
    result = plan(model, quantization, batch, seq, answer_tokens, checkpointing)
    described = {
        "model": name,
        "dtype": dtype_name,
        "quantization": quantization.describe(),
        "adapter_config": f"{adapter.method} r {adapter.r} on {','.join(adapter.target_modules)}",
        "checkpointing": checkpointing,
        "batch": batch,
        "seq": seq,
        "answer_tokens": answer_tokens,
    }
    return result, described


def format_plan(result: Plan, described: dict) -> str:
    """The prediction as a small table (MiB)."""
    rows = [
        ("weights (frozen base)", result.weights),
        (f"adapter parameters ({result.trainable:,})", result.adapter_params),
        ("adapter gradients", result.adapter_grads),
        ("AdamW state (2 moments)", result.optimizer),
        ("saved activations", result.activations),
        ("transient (logits, backward working set)", result.transient),
        ("total", result.total),
    ]
    head = ", ".join(f"{k} {v}" for k, v in described.items())
    lines = [head, "", "| part | MiB |", "|---|---:|"]
    lines += [f"| {name} | {value / MIB:,.1f} |" for name, value in rows]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument is the training command line's: --config (repeatable, later wins) and "
        "--section.key value overrides, read as `python main.py fit` reads them.",
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: data.batch_size)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: data.max_length)")
    parser.add_argument("--answer-tokens", type=int, default=4, help="loss positions per sequence")
    parser.add_argument("--model-config", default=None, help="config.json of a hub model not available offline")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    args, overrides = parser.parse_known_args(argv)
    try:
        options = read_options(overrides)
        batch = args.batch or options["data"]["batch_size"]
        seq = args.seq or options["data"]["max_length"]
        if batch < 1 or seq < 1:  # by hand: --batch and --seq are plain argparse options
            raise ValueError(f"--batch and --seq: expected integers >= 1, got {batch} and {seq}")
        result, described = plan_from_options(options, batch, seq, args.answer_tokens, args.model_config)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    print(json.dumps(described | result.to_dict()) if args.json else format_plan(result, described))
    return result


if __name__ == "__main__":
    main()
