"""Scalar summaries of routing statistics (``mosld.router_stats``) for loggers, shared by Lightning's
``RouterStatsCallback`` and the Hugging Face Trainer callback (``mosld.integrations.hf``); no Lightning here."""

from __future__ import annotations


def short_layer_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``L03.q_proj``."""
    parts = name.split(".")
    index = next((p for p in parts if p.isdigit()), None)
    return f"L{int(index):02d}.{parts[-1]}" if index is not None else name


def router_scalars(stats: dict, prefix: str, per_layer: bool = False, per_expert: bool = False) -> dict[str, float]:
    """The scalars of one logging point from per-layer ``{"load": (N,), "entropy": ()}`` statistics.

    Always ``<prefix>/entropy`` (mean over layers) and, where some layer's router chooses (more experts than
    top-k; the loads of a layer sum to top-k), ``<prefix>/load_max`` and ``<prefix>/load_min`` over those
    layers' experts; per layer and per expert only when asked.
    """
    metrics: dict[str, float] = {}
    entropies, choosing = [], []
    for name, s in stats.items():
        layer = short_layer_name(name)
        load, entropy = s["load"], float(s["entropy"])
        entropies.append(entropy)
        if len(load) > round(float(load.sum())) > 0:  # top-k = the loads' sum; all chosen: load 1 by construction
            choosing.append(load)
        if per_layer:
            metrics[f"{prefix}/entropy/{layer}"] = entropy
            metrics[f"{prefix}/load_max/{layer}"] = float(load.max())
        if per_expert:
            for i, value in enumerate(load.tolist()):
                metrics[f"{prefix}/load/{layer}/e{i}"] = value
    metrics[f"{prefix}/entropy"] = sum(entropies) / len(entropies)
    if choosing:
        metrics[f"{prefix}/load_max"] = max(float(v.max()) for v in choosing)
        metrics[f"{prefix}/load_min"] = min(float(v.min()) for v in choosing)
    return metrics
