"""FSDP with the adapters in their own units.

The frozen base is sharded per decoder layer (the classes a ``transformers`` model lists in
``_no_split_modules``). Each adapted projection's frozen ``base_layer`` is its own unit, and each
``MoSLDLinear`` is a unit that then holds only its adapter and router tensors: frozen and
trainable tensors never share a flat parameter.
"""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from ..adapters import MoSLDLinear


def adapter_wrap_modules(model: nn.Module) -> set[int]:
    """ids of the modules that become FSDP units: decoder layers, adapter layers, adapted base layers."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    units = set()
    for module in model.modules():
        if isinstance(module, MoSLDLinear):
            units.update({id(module), id(module.base_layer)})
        elif type(module).__name__ in names:
            units.add(id(module))
    return units


def _wrap_if_unit(module: nn.Module, recurse: bool, nonwrapped_numel: int, units: set[int]) -> bool:
    return True if recurse else id(module) in units


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with the wrap policy described in the module docstring.

    Accepts every ``FSDPStrategy`` argument; an explicit ``auto_wrap_policy`` is refused, since
    this strategy exists to set it.
    """

    def __init__(self, **kwargs) -> None:
        if kwargs.get("auto_wrap_policy") is not None:
            raise ValueError(
                "AdapterFSDPStrategy: auto_wrap_policy is set by the strategy; use FSDPStrategy to choose your own"
            )
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            # FSDP turns itself into NO_SHARD on one process, and torch's NO_SHARD with
            # use_orig_params fails on tied embeddings (SmolLM2, Qwen2, ...) with an obscure
            # "as_params=True type(prim_param)" AssertionError (seen with torch 2.11 and 2.13).
            raise ValueError(
                "AdapterFSDPStrategy needs at least 2 processes (devices x nodes); on one device FSDP does not "
                "shard anything: use strategy 'auto' (or 'ddp') instead"
            )
        units = adapter_wrap_modules(model)
        self.kwargs["auto_wrap_policy"] = functools.partial(_wrap_if_unit, units=units)
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning passes device_id=None on CPU, which FSDP refuses; gloo FSDP on CPU needs the
        # device given explicitly (used by the CPU tests).
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def lightning_module_state_dict(self) -> dict:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        # On CPU, offloading the gathered tensors "to CPU" (Lightning's default for several
        # ranks) crashes torch's FSDP state-dict hook; they are on the CPU already.
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()
