"""Ratios, the markdown table, the machine description and the JSON/markdown outputs of a bench run."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path

import torch


def iqr(values: list[float]) -> float:
    """Interquartile range (0 for fewer than four values)."""
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def add_ratios(variants: dict[str, dict]) -> None:
    """Add each variant's time and memory as ratios to peft d0, peft d0.05 and the floor, in place."""
    for ref in ("peft_d0", "peft_d05", "floor"):
        base = variants.get(ref, {})
        for entry in variants.values():
            if "step_ms" in entry and "step_ms" in base:
                entry[f"time_x_{ref}"] = entry["step_ms"] / base["step_ms"]
                # Paired: the median of step-by-step ratios within the same round, which cancels
                # load drifting over the run (the i-th steps of two variants ran seconds apart).
                pairs = [a / b for a, b in zip(entry["times_ms"], base["times_ms"], strict=False)]
                entry[f"time_x_{ref}_paired"] = statistics.median(pairs) if pairs else None
            if "mem_peak_mib" in entry and "mem_peak_mib" in base:
                entry[f"mem_x_{ref}"] = entry["mem_peak_mib"] / base["mem_peak_mib"]
            if entry.get("mem_saved_mib") and base.get("mem_saved_mib"):
                entry[f"saved_x_{ref}"] = entry["mem_saved_mib"] / base["mem_saved_mib"]


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(results: list[dict], machine: dict) -> str:
    """One table per (shape, mode) result, then the machine line."""
    lines = []
    for res in results:
        head = (
            f"### {res['shape']}, {res['mode']}, {res['device']} ({res['dtype']}, batch {res['batch']} x "
            f"{res['seq']} tokens, targets {','.join(t.removesuffix('_proj') for t in res['targets'])})"
        )
        lines += [
            head,
            "",
            "| variant | trainable | step ms (median) | IQR ms | tokens/s | peak MiB | saved MiB "
            "| time x peft d0 | paired x peft d0 | time x peft d0.05 | mem x peft d0 | mem x peft d0.05 "
            "| saved x peft d0.05 | time x floor |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in res["variants"].values():
            if "error" in e and "step_ms" not in e:
                lines.append(f"| {e['label']} | {e['trainable_params']:,} | {e['error']} |" + " |" * 11)
                continue
            lines.append(
                f"| {e['label']} | {e['trainable_params']:,} | {_fmt(e.get('step_ms'), '.1f')} "
                f"| {_fmt(e.get('step_ms_iqr'), '.1f')} | {_fmt(e.get('tokens_per_s'), ',.0f')} "
                f"| {_fmt(e.get('mem_peak_mib'), ',.0f')} | {_fmt(e.get('mem_saved_mib'), ',.0f')} "
                f"| {_fmt(e.get('time_x_peft_d0'), '.2f')} | {_fmt(e.get('time_x_peft_d0_paired'), '.2f')} "
                f"| {_fmt(e.get('time_x_peft_d05'), '.2f')} "
                f"| {_fmt(e.get('mem_x_peft_d0'), '.2f')} | {_fmt(e.get('mem_x_peft_d05'), '.2f')} "
                f"| {_fmt(e.get('saved_x_peft_d05'), '.2f')} | {_fmt(e.get('time_x_floor'), '.2f')} |"
            )
        lines.append("")
    lines.append(f"Machine: {machine['summary']}")
    return "\n".join(lines) + "\n"


def machine_info(device: torch.device) -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    where = info.get("gpu") or f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    info["summary"] = (
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft_version}, "
        f"Python {info['python']}"
    )
    return info


def write_outputs(
    results: list[dict], machine: dict, args: argparse.Namespace, json_path: Path | None, md_path: Path | None
) -> str:
    """Write the JSON (every step time), the markdown tables and ``profiles.txt`` beside them; return the tables."""
    text = markdown(results, machine)
    folder = json_path.parent if json_path is not None else (md_path.parent if md_path is not None else None)
    profiles = [report for res in results for report in res.get("profiles", [])]
    if profiles and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "profiles.txt").write_text("\n".join(profiles))
    payload = {
        "machine": machine,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "results": [{k: v for k, v in res.items() if k != "profiles"} for res in results],
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(text)
    return text
