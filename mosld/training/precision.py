"""``trainer.precision: auto``: the fastest precision the hardware computes natively.

On a CPU without native bf16 (AVX2 only: no AVX512-BF16, no AMX) PyTorch emulates bf16 matmuls,
about 50x slower than fp32 (measured on an AVX2 EPYC: 1.1 vs 64 GFLOP/s), so ``bf16-mixed`` there
turns an 11-minute run into hours. The rule:

- CUDA: ``bf16-mixed`` where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else ``16-mixed``.
- CPU: ``bf16-mixed`` where a one-thread 256x256 matmul probe (~20 ms) finds bf16 less than 1.5x
  fp32's time, else ``32-true``. The CPU flags (AMX, AVX512-BF16) are reported beside it; the probe
  decides, since a VM or ``ONEDNN_MAX_CPU_ISA`` can hide instructions the flags announce.
- Anything else (MPS, ...): ``32-true``.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_only

AUTO = "auto"


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str

    def message(self) -> str:
        return f"trainer.precision auto -> {self.precision}: {self.reason}"


# bf16 counts as native when a probe matmul in bf16 takes less than this multiple of fp32's time.
# Measured at 256x256, one thread: 0.22 with AVX512-BF16, 31 with AVX2 only (oneDNN capped at AVX2).
NATIVE_BF16_MAX_RATIO = 1.5


def _matmul_seconds(dtype: torch.dtype, size: int = 256, repeats: int = 3) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: first call allocates and picks a kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def bf16_matmul_ratio() -> float:
    """Time of a 256x256 bf16 matmul over fp32's, on one thread (other threads' load would only add noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _matmul_seconds(torch.bfloat16) / _matmul_seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)


@functools.cache  # the hardware does not change within a process: the trainer and the run record share one probe
def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and what that was decided from.

    The CPU flags say what the hardware has; a ~20 ms probe says what this PyTorch build makes of it
    (a VM or ``ONEDNN_MAX_CPU_ISA`` can hide the flags' instructions), and decides.
    """
    flags = [name for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, check, lambda: False)()]  # fmt: skip
    ratio = bf16_matmul_ratio()
    native = ratio < NATIVE_BF16_MAX_RATIO
    has = " and ".join(flags) if flags else f"no AVX512-BF16 or AMX ({torch.backends.cpu.get_cpu_capability()})"
    verdict = "native bf16" if native else "bf16 emulated"
    return native, f"the CPU has {has}; a bf16 matmul probe took {ratio:.2f}x fp32's time: {verdict}"


def choose_precision(accelerator: str | None = None) -> PrecisionChoice:
    """The precision ``auto`` stands for on this machine's ``accelerator`` (``auto``/None: CUDA if present)."""
    accelerator = (accelerator or "auto").lower()
    use_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16-mixed", f"{torch.cuda.get_device_name()} supports bf16")
        return PrecisionChoice("16-mixed", f"{torch.cuda.get_device_name()} has no bf16; fp16 with loss scaling")
    if accelerator in ("cpu", "auto"):
        native, why = cpu_bf16_support()
        return PrecisionChoice("bf16-mixed" if native else "32-true", why)
    return PrecisionChoice("32-true", f"accelerator {accelerator}: full precision")


def resolve_precision(precision, accelerator) -> PrecisionChoice | None:
    """The choice for ``precision == 'auto'``; None for any explicit precision (it always wins)."""
    if str(precision) != AUTO:
        return None
    return choose_precision(accelerator if isinstance(accelerator, str) else None)


@rank_zero_only
def announce(message: str) -> None:
    print(message, file=sys.stderr)


class AutoPrecisionTrainer(Trainer):
    """Lightning's ``Trainer`` that also takes ``precision="auto"`` (``choose_precision``).

    The choice and its reason are printed and kept in ``precision_choice`` (``None`` when the
    precision was given explicitly). The command line resolves ``auto`` itself, with the other options
    (``MoSLDCLI.before_instantiate_classes``); this class gives its parser the type that admits ``auto``.
    """

    def __init__(self, *args, precision: Literal["auto"] | _PRECISION_INPUT | None = None, **kwargs) -> None:
        self.precision_choice = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        if self.precision_choice is not None:
            precision = self.precision_choice.precision
            announce(self.precision_choice.message())
        super().__init__(*args, precision=precision, **kwargs)
