"""mosld: mixture of shared LoRA experts with dropout (MoSLD, COLING 2025) for Hugging Face causal LMs.

The public API::

    import mosld
    cfg = mosld.AdapterConfig(method="mosld", r=8, alpha=16, num_experts=(8, 6, 4, 2))
    model = mosld.inject_adapters(model, cfg)
    mosld.save_adapter(model, "out/adapter")
    model = mosld.load_adapter(base_model, "out/adapter")
    mosld.export_peft(model, "out/peft", mosld.mean_gates(model, batches))  # a plain LoRA (docs/serving.md)
"""

from .adapters import (
    AdapterConfig,
    MoSLDLinear,
    adapter_layers,
    adapter_state_dict,
    aux_loss,
    count_parameters,
    export_peft,
    inject_adapters,
    load_adapter,
    mean_gates,
    merge_adapters,
    router_stats,
    save_adapter,
    set_aux_loss,
    set_router_stats,
    set_static_gates,
    unmerge_adapters,
)

__version__ = "0.1.0"


def evaluate(*args, **kwargs):
    """Multiple-choice accuracy per task; see ``mosld.evaluation.evaluate``."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = [
    "AdapterConfig",
    "MoSLDLinear",
    "adapter_layers",
    "adapter_state_dict",
    "aux_loss",
    "count_parameters",
    "evaluate",
    "export_peft",
    "inject_adapters",
    "load_adapter",
    "mean_gates",
    "merge_adapters",
    "router_stats",
    "save_adapter",
    "set_aux_loss",
    "set_router_stats",
    "set_static_gates",
    "unmerge_adapters",
]
