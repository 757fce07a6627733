"""Quantized frozen bases: bitsandbytes 4-bit (NF4 / FP4, QLoRA) and 8-bit (LLM.int8) at load time.

The base's projections become ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` (both subclasses of
``nn.Linear``), which the adapters wrap unchanged as their ``base_layer``; embeddings, norms and the LM
head stay in ``model.dtype``. Only the frozen base is quantized: adapters and router keep their own
dtype, and their math runs in the layer's input dtype (``MoSLDLinear.compute_dtype``). bitsandbytes is
an optional extra (``pip install 'mosld[quant]'``); 0.49 and later run on the CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from .dtypes import DTYPES

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # of mosld.dtypes.DTYPES: a quantized base computes in these
INSTALL_HINT = "pip install 'mosld[quant]' (bitsandbytes >= 0.49 has a CPU backend)"


@dataclass
class QuantizationConfig:
    """How the frozen base is quantized when it loads (transformers' ``BitsAndBytesConfig``).

    Args:
        bits: 4 (QLoRA: NF4 or FP4 blocks of 64 weights with a scale each) or 8 (LLM.int8: row-wise
            int8 with fp16 outlier columns); ``None`` loads the base unquantized.
        quant_type: 4-bit data type: ``nf4`` (normal-float, QLoRA's choice) or ``fp4``.
        double_quant: 4-bit only: quantize the block scales too (about 0.4 bits per weight less).
        compute_dtype: 4-bit only: dtype the weights are dequantized to for each matmul; ``None`` takes
            ``model.dtype``.
    """

    bits: Literal[4, 8] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise ValueError(f"bits: expected 4, 8 or null, got {self.bits!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type: expected 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype: expected one of {sorted(COMPUTE_DTYPES)} or null, got {self.compute_dtype!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def describe(self) -> str:
        if self.bits == 4:
            return f"4-bit {self.quant_type}" + (" (double quantization)" if self.double_quant else "")
        return "8-bit LLM.int8" if self.bits == 8 else "unquantized"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_value(cls, value: QuantizationConfig | dict | None) -> QuantizationConfig:
        """From a checkpoint's or a config's dict (or None: unquantized)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(**dict(value))


def dtype_error(config: QuantizationConfig, dtype: str) -> str | None:
    """Why the base's ``dtype`` cannot go with this quantization, or None."""
    if config.enabled and dtype == "float64":
        return "a quantized base computes in float32, bfloat16 or float16, not float64"
    return None


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(option: str = "model.quantization") -> None:
    if not bitsandbytes_available():
        raise ImportError(f"{option}: a quantized base needs bitsandbytes, which is not installed; {INSTALL_HINT}")


def bitsandbytes_config(config: QuantizationConfig, model_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``config`` (None when it quantizes nothing)."""
    if not config.enabled:
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if config.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES[config.compute_dtype] if config.compute_dtype else model_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def is_quantized_layer(layer: nn.Module) -> bool:
    """True for a bitsandbytes quantized projection (its weight is packed, not a plain matrix)."""
    return type(layer.weight).__name__ in ("Params4bit", "Int8Params") if hasattr(layer, "weight") else False


def keep_quantized_base_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers changed.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight into an inference layout at its first
    no-grad eval forward, and from then on computes with a kernel that has no backward: gradients stop
    silently at every quantized projection, also in later training steps (bitsandbytes 0.50.2). A
    validation before training would trigger it. mosld trains after evaluating, so it keeps the
    differentiable layout; inference then runs the dequantize-and-matmul path.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
