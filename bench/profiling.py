"""One profiled training step per variant: where the time goes (device vs host, top operators, syncs)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch


def profile_step(step: Callable[[], None], device: torch.device, tag: str) -> str:
    """One call of ``step`` (a training step) under torch.profiler: the top ops by device and by host time, and both totals.

    When the host total is near the step time and the device total well below it, the step is
    bound by the host's per-op cost (eager dispatch), not by the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    syncs = count_host_syncs(step) if device.type == "cuda" else None
    step()
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    device_total = sum(getattr(e, device_key, 0) for e in events) / 1e3
    host_total = sum(e.self_cpu_time_total for e in events) / 1e3
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    text = [
        f"## {tag}: profiled step {1e3 * wall:.1f} ms wall, "
        f"self device time {device_total:.1f} ms, self host time {host_total:.1f} ms, {ops} aten op calls"
        + ("" if syncs is None else f", {len(syncs)} host-device syncs"),
    ]
    text += [f"  sync: {where}" for where in sorted(set(syncs or []))[:10]]
    if device.type == "cuda":
        text.append(events.table(sort_by=device_key, row_limit=25, max_name_column_width=60))
    text.append(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    return "\n".join(text) + "\n"


def count_host_syncs(step: Callable[[], None]) -> list[str]:
    """One step under CUDA's sync debug mode: the operations that made the host wait for the GPU.

    A sync in the forward or backward (``.item()``, a data-dependent shape) stalls the launch queue,
    which on a launch-bound step costs far more than the kernel itself.
    """
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return [
        f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}: {str(w.message)[:80]}" for w in caught if "sync" in str(w.message)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
