"""A finished run folder, or an adapter folder, read back as the model to load: its base model, dtype and adapter.

Shared by the tools that load a run as the training command line would (the lm-evaluation-harness bridge,
``mosld.tools.harness``) and the server (``mosld.serve``); the errors name the ``--run`` / ``--adapter`` option
those commands take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import ArgumentError

from ..adapters.io import read_adapter_config
from ..models import load_base_model
from .cli import read_config


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a base model, optionally with a mosld adapter folder."""

    base: str
    adapter: Path | None
    dtype: str = "float32"
    trust_remote_code: bool = False


def spec_from_run(run: str | Path) -> ModelSpec:
    """The base model, dtype and adapter of a run folder (``lightning_logs/version_N``).

    Its ``config.yaml`` is read by the training command line's own parser (``mosld.training.cli.read_config``):
    what ``python main.py fit --config <it>`` would refuse is refused here with the same message.
    """
    run = Path(run)
    config_file, adapter = run / "config.yaml", run / "adapter"
    for path in (config_file, adapter / "adapter_config.json"):
        if not path.is_file():
            raise FileNotFoundError(
                f"--run {run}: {path} not found; expected a finished run folder (lightning_logs/version_N holding "
                "config.yaml and the adapter/ that fit writes at its end)"
            )
    try:
        model = read_config(["--config", str(config_file)]).model
    except ArgumentError as err:
        raise ValueError(f"--run {run}: {config_file}: {err}") from None
    return ModelSpec(
        base=str(model.model_name_or_path),
        adapter=adapter,
        dtype=str(model.dtype),
        trust_remote_code=bool(model.trust_remote_code),
    )


def spec_from_adapter(adapter: str | Path) -> ModelSpec:
    """An adapter folder's base model, as its ``adapter_config.json`` records it."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: not a folder (expected adapter_model.safetensors + config)")
    base = read_adapter_config(adapter)["base_model"].get("name_or_path") or ""
    return ModelSpec(base=base, adapter=adapter)  # the base's dtype is not recorded: float32 unless --dtype


def resolve_spec(
    run: str | Path | None = None,
    adapter: str | Path | None = None,
    base: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> ModelSpec:
    """The model of ``run`` (a run folder), ``adapter`` (an adapter folder) or ``base`` (a model name or path);
    ``base``, ``dtype`` and ``trust_remote_code`` override what the run or adapter records."""
    if run and adapter:
        raise ValueError("--run and --adapter: give one (a run folder holds its adapter in adapter/)")
    if run:
        spec = spec_from_run(str(run))  # str: lm-eval reads a value such as 0 as a number
    elif adapter:
        spec = spec_from_adapter(str(adapter))
    elif base:
        spec = ModelSpec(base=str(base), adapter=None)
    else:
        raise ValueError("give --run, --adapter or --base (the model to load)")
    base = str(base) if base else spec.base
    if not base:
        raise ValueError(f"--adapter {adapter}: its config does not name the base model; give --base")
    return ModelSpec(base, spec.adapter, dtype or spec.dtype, bool(trust_remote_code) or spec.trust_remote_code)


def load_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    """The base model with its adapter injected and routed, in eval mode on ``device``."""
    model = load_base_model(spec.base, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    if spec.adapter is not None:
        from mosld.adapters.io import load_adapter

        model = load_adapter(model, spec.adapter)
    return model.to(device).eval()
