"""What the server loads: a finished run, an adapter folder or a plain base, with the run's precision and device.

A run folder (``lightning_logs/version_N``) names its base, dtype and quantization in ``config.yaml`` (the
``model`` section) and its precision in the ``trainer`` section (``auto`` is recorded there as what it chose);
its adapter is ``adapter/``. The adapter is injected with ``mosld.load_adapter``: routers and every expert, so
the mixture is served routed per token exactly as trained. ``static_gates`` names a set of fixed gates from the
run's ``peft/gates.json`` (``scripts/export_peft.py``): the collapsed adapter, for comparison, still computed by
mosld's layers. ``peft`` serves an exported peft LoRA folder with peft itself, unmerged, as a multi-LoRA server
would run the collapsed adapter (``merge_peft`` merges it into the base: then it costs what the base costs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from mosld.adapters.export import read_export_gates
from mosld.adapters.io import load_adapter
from mosld.adapters.static import set_static_gates
from mosld.models import load_base_model, load_tokenizer
from mosld.quantization import QuantizationConfig
from mosld.training.run_folder import ModelSpec, resolve_spec

# Lightning precision -> (autocast dtype, or None; dtype the model is cast to, or None)
PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype | None]] = {
    "32-true": (None, None),
    "32": (None, None),
    "64-true": (None, torch.float64),
    "bf16-mixed": (torch.bfloat16, None),
    "16-mixed": (torch.float16, None),
    "bf16-true": (None, torch.bfloat16),
    "16-true": (None, torch.float16),
}


@dataclass
class ServedModel:
    """The model and tokenizer to serve, and how (device, autocast dtype, what was loaded)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    autocast: torch.dtype | None
    context_length: int
    description: str


def run_settings(run: Path) -> tuple[QuantizationConfig, str]:
    """The run's base quantization and trainer precision (its ``config.yaml``)."""
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    model = config.get("model") or {}
    model = model.get("init_args", model) if isinstance(model, dict) else {}
    trainer = config.get("trainer") or {}
    return QuantizationConfig.from_value(model.get("quantization")), str(trainer.get("precision") or "32-true")


def read_gates(file: Path, name: str) -> dict[str, torch.Tensor]:
    """The fixed gates named ``name`` (a training task or ``mixture``) in an ``export_peft.py`` gates.json."""
    if not file.is_file():
        raise FileNotFoundError(
            f"--static-gates: {file} not found; write it with `python scripts/export_peft.py RUN` or give --gates"
        )
    gates, _ = read_export_gates(file)
    if name not in gates:
        raise ValueError(f"--static-gates {name}: not in {file}; it has {', '.join(gates) or 'no gates'}")
    return gates[name]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_served_model(
    *,
    run: Path | None = None,
    adapter: Path | None = None,
    base: str | None = None,
    dtype: str | None = None,
    precision: str | None = None,
    quantization_bits: int | None = None,
    device: str = "auto",
    static_gates: str | None = None,
    gates_file: Path | None = None,
    peft: Path | None = None,
    merge_peft: bool = False,
    no_adapter: bool = False,
    context_length: int | None = None,
) -> ServedModel:
    """Load what ``python -m mosld.serve`` serves (see the module docstring); the options override the run's."""
    if sum(x is not None for x in (run, adapter, peft)) > 1:
        raise ValueError("--run, --adapter and --peft: give one (a run folder holds its adapter in adapter/)")
    quantization, run_precision = QuantizationConfig(), "32-true"
    if peft is not None:
        config = Path(peft) / "adapter_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"--peft {peft}: no adapter_config.json (expected a peft LoRA folder)")
        base = base or json.loads(config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"--peft {peft}: its adapter_config.json does not name the base model; give --base")
    spec = resolve_spec(run, adapter, base, dtype)
    if run is not None:
        quantization, run_precision = run_settings(Path(run))
    if no_adapter:  # the run's base with the run's settings: the baseline a benchmark compares with
        spec = ModelSpec(spec.base, None, spec.dtype, spec.trust_remote_code)
    if quantization_bits is not None:
        quantization = QuantizationConfig(bits=quantization_bits)
    precision = run_precision if precision in (None, "auto") and run is not None else precision or "auto"
    if precision == "auto":  # as the trainer resolves it: the fastest precision this hardware computes natively
        from mosld.training.precision import choose_precision

        precision = choose_precision("cuda" if resolve_device(device).type == "cuda" else "cpu").precision
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    autocast, cast = PRECISIONS[precision]

    model = load_base_model(
        spec.base, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, quantization=quantization
    )
    if spec.adapter is not None:
        model = load_adapter(model, spec.adapter)
    if peft is not None:
        import peft as peft_library  # only for this option (the bench and dev extras have it)

        model = peft_library.PeftModel.from_pretrained(model, str(peft))
        if merge_peft:
            model = model.merge_and_unload()
    if static_gates is not None:
        if spec.adapter is None:
            raise ValueError("--static-gates: a plain base has no gates; give --run or --adapter")
        file = gates_file or (Path(run) / "peft" / "gates.json" if run is not None else None)
        if file is None:
            raise ValueError("--static-gates with --adapter: give --gates (a gates.json of scripts/export_peft.py)")
        set_static_gates(model, read_gates(Path(file), static_gates))
    if not quantization.enabled:  # bitsandbytes places quantized weights itself
        model = model.to(resolve_device(device))
    if cast is not None:
        model = model.to(cast)
    model.eval()
    tokenizer = load_tokenizer(spec.base, trust_remote_code=spec.trust_remote_code)
    limit = context_length or getattr(model.config, "max_position_embeddings", None) or 2048
    what = f"{spec.adapter or peft} on {spec.base}" if spec.adapter or peft else spec.base
    routing = f", fixed gates {static_gates!r}" if static_gates else (", routed per token" if spec.adapter else "")
    routing += (", peft LoRA merged" if merge_peft else ", peft LoRA") if peft else ""
    description = f"{what}{routing}; {precision}, {next(model.parameters()).device}"
    return ServedModel(model, tokenizer, autocast, int(limit), description)
