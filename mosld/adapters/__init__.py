"""Adapter layers, their injection into causal LMs, and the adapter file format."""

from .config import METHODS, AdapterConfig
from .export import export_peft
from .inject import (
    adapter_layers,
    adapter_state_dict,
    aux_loss,
    count_parameters,
    inject_adapters,
    merge_adapters,
    router_stats,
    set_aux_loss,
    set_router_stats,
    unmerge_adapters,
)
from .io import load_adapter, save_adapter
from .layer import ADAPTER_PREFIX, MoSLDLinear, is_adapter_parameter
from .static import check_gates, mean_gates, set_static_gates

__all__ = [
    "ADAPTER_PREFIX",
    "METHODS",
    "AdapterConfig",
    "MoSLDLinear",
    "adapter_layers",
    "adapter_state_dict",
    "aux_loss",
    "check_gates",
    "count_parameters",
    "export_peft",
    "inject_adapters",
    "is_adapter_parameter",
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
