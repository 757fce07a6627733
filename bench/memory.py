"""Memory measures of one training step: resident tensors, peak growth (CPU RSS or CUDA), saved activations."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


class CpuMemory:
    """Peak resident-set growth of one step, read from Linux's /proc (VmHWM reset via clear_refs).

    Freed heap pages are handed back to the OS with ``malloc_trim`` first, so that one variant's
    step does not reuse pages another variant's step left mapped and look smaller than it is.
    """

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.available = Path("/proc/self/clear_refs").exists()

    def keep_freed_memory(self) -> None:
        """Serve every tensor from glibc's heap and never give freed pages back on its own.

        By default tensors above a few MiB are mmap-ed and unmapped on free, so every step
        page-faults its activations in again (hundreds of ms, varying with the neighbours'
        load). Reusing freed heap memory is what a caching allocator (the GPU's, jemalloc)
        does; it leaves the memory step's explicit ``malloc_trim`` + high-water mark intact.
        """
        if self._libc is None:
            return
        m_trim_threshold, m_mmap_max = -1, -4
        self._libc.mallopt(m_mmap_max, 0)
        self._libc.mallopt(m_trim_threshold, 2**30)

    @staticmethod
    def _status(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) * 1024 if match else 0

    def start(self) -> int:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the variant keeps between steps: parameters, buffers, optimizer state (storages counted once)."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class SavedTensors:
    """Bytes autograd saves for backward during a forward (distinct storages, parameters excluded).

    Exact where the CPU's peak RSS is crude; on either device it is the activation memory an
    adapter adds. Not available for compiled variants (their graphs save tensors internally).
    """

    def __init__(self, model: nn.Module, exclude: Iterable[torch.Tensor] = ()) -> None:
        # ``exclude``: weights ``model.parameters()`` does not reach (MoE-PEFT keeps its layers in plain lists and dicts)
        self.params = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *exclude)}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())
