"""The peer benchmark's tables, from its results JSON (``python -m bench.peers.report RESULTS.json``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _mib(entry: dict, key: str) -> float | None:
    value = entry.get("memory", {}).get(key)
    return None if value is None else value / 2**20


def _ratio(block: dict | None) -> str:
    if not block:
        return "—"
    return f"{block['paired_median']:.2f} ({block['paired_min']:.2f}-{block['paired_max']:.2f})"


def markdown(results: dict) -> str:
    """Per-variant figures, then the mosld / MoE-PEFT ratios of the matched pairs, then the versions."""
    head = (
        f"{results['shape']} ({results['base']} weights), {results['device']}, {results['dtype']}, batch "
        f"{results['batch']} x {results['seq']} tokens, {results['threads']} thread(s) per side, "
        f"{results['rounds']} interleaved rounds after {results['warmup']} warm-up step(s); "
        f"mosld side attention: {results['mosld_attn']}; balancing loss "
        f"{'on (0.001)' if results['balance_loss'] else 'off'}"
    )
    lines = [
        f"#### Per variant: {head}",
        "",
        "| side | variant | trainable | step ms (median) | IQR ms | forward ms (median) | adapter ms (step - floor) "
        "| peak MiB | saved MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["variants"].values():
        label = entry.get("label", entry["variant"])
        if "error" in entry and not entry.get("step_times_ms"):
            lines.append(f"| {entry['side']} | {label} | — | {entry['error'][:200]} | | | | | |")
            continue
        lines.append(
            f"| {entry['side']} | {label} | {entry.get('trainable', 0):,} | {_fmt(entry.get('step_ms'), '.1f')} "
            f"| {_fmt(entry.get('step_ms_iqr'), '.1f')} | {_fmt(entry.get('forward_ms'), '.1f')} "
            f"| {_fmt(entry.get('adapter_ms'), '.1f')} | {_fmt(_mib(entry, 'peak'), ',.0f')} "
            f"| {_fmt(_mib(entry, 'saved'), ',.0f')} |"
        )
    lines += [
        "",
        "#### mosld / MoE-PEFT, matched configurations (paired: median of the per-round ratios, range over rounds)",
        "",
        "| mosld side | MoE-PEFT | step time, medians | step time, paired (range) | forward, paired (range) "
        "| adapter's own step cost | peak memory | saved for backward |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {key: entry.get("label", entry["variant"]) for key, entry in results["variants"].items()}
    for pair in results["pairs"]:
        step = pair.get("step")
        ours, theirs = labels["mosld:" + pair["mosld"]], labels["moe_peft:" + pair["moe_peft"]]
        lines.append(
            f"| {ours} | {theirs} "
            f"| {_fmt(step and step['ratio_of_medians'], '.2f')} | {_ratio(step)} | {_ratio(pair.get('forward'))} "
            f"| {_fmt(pair.get('adapter_ratio'), '.2f')} | {_fmt(pair.get('peak_ratio'), '.2f')} "
            f"| {_fmt(pair.get('saved_ratio'), '.2f')} |"
        )
    lines += ["", "Versions: " + "; ".join(_versions(info) for info in results["machine"].values())]
    if "seconds" in results:
        lines.append(f"Run time: {results['seconds']:.0f} s (`{results.get('command', '')}`)")
    return "\n".join(lines) + "\n"


def _versions(info: dict) -> str:
    packages = ", ".join(
        f"{k} {v}" for k, v in info.items() if k in ("torch", "transformers", "peft", "moe-peft") and v
    )
    return f"{info['side']} side: {packages}, Python {info['python']}, {info['torch_threads']} torch thread(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, help="a bench.peers.compare results JSON")
    print(markdown(json.loads(parser.parse_args(argv).results.read_text())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
