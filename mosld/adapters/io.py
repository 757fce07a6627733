"""The adapter file format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Only adapter and router tensors are written, under their module names in the model. The JSON
records the adapter configuration, the experts of every adapted module and the base model's
shape, so that loading onto a different base is refused with a message saying what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import AdapterConfig
from .inject import adapter_layers, adapter_parameter_names, adapter_state_dict, inject_adapters, num_decoder_layers

FORMAT = "mosld-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def base_model_signature(model: nn.Module) -> dict:
    """What an adapter needs to match in a base model."""
    config = getattr(model, "config", None)
    return {
        "name_or_path": str(getattr(config, "name_or_path", "") or ""),
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": num_decoder_layers(model),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def save_adapter(model: nn.Module, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter of ``model`` into the folder ``path`` (created if needed).

    Args:
        model: A model with injected adapters.
        path: Output folder.
        state_dict: The adapter tensors to write, by the same names as ``adapter_state_dict(model)``
            (for strategies such as FSDP that gather full tensors separately); default: the model's.

    Returns:
        The folder written.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no adapters (call mosld.inject_adapters first)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("save_adapter: unmerge the adapters first (mosld.unmerge_adapters)")
    config: AdapterConfig = model.adapter_config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = adapter_state_dict(model)
    expected = adapter_parameter_names(model)
    if set(state_dict) != set(expected):
        raise ValueError(
            f"save_adapter: state_dict names differ from the model's adapters "
            f"(e.g. {sorted(set(state_dict) ^ set(expected))[:3]})"
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": config.to_dict(),
        "base_model": base_model_signature(model),
        "modules": {
            name: {"in_features": m.in_features, "out_features": m.out_features, "num_experts": m.num_experts}
            for name, m in layers.items()
        },
    }
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter_config(path: str | Path) -> dict:
    """The parsed ``adapter_config.json`` of an adapter folder, checked for format and version."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config (expected {CONFIG_NAME} beside {WEIGHTS_NAME})")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {meta['format_version']} is newer than this mosld reads ({FORMAT_VERSION})"
        )
    return meta


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved in ``path`` into a freshly loaded stock ``base_model``.

    Raises:
        ValueError: the base model differs from the one the adapter was trained on (hidden
            size, layer count, model type, vocabulary, or an adapted module missing or of
            another shape); the message lists every difference.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    expected, actual = meta["base_model"], base_model_signature(base_model)
    differences = [
        f"{key}: adapter expects {expected[key]!r}, base model has {actual[key]!r}"
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        if expected.get(key) is not None and expected.get(key) != actual[key]
    ]
    modules = dict(base_model.named_modules())
    for name, shape in meta["modules"].items():
        module = modules.get(name)
        if module is None:
            differences.append(f"module {name}: missing in the base model")
            continue
        weight = getattr(module, "weight", None)
        dims = set(weight.shape) if weight is not None else set()
        if {shape["in_features"], shape["out_features"]} - dims:
            differences.append(
                f"module {name}: adapter expects {shape['in_features']} -> {shape['out_features']}, "
                f"base weight is {tuple(weight.shape) if weight is not None else 'absent'}"
            )
    if differences:
        raise ValueError(
            f"adapter {path} does not fit this base model ({actual['name_or_path'] or type(base_model).__name__}; "
            f"trained on {expected.get('name_or_path') or 'unknown'}):\n  " + "\n  ".join(differences)
        )
    config = AdapterConfig.from_dict(meta["adapter"])
    inject_adapters(base_model, config)
    tensors = load_file(str(path / WEIGHTS_NAME))
    own = adapter_state_dict(base_model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS_NAME}: tensors do not match the adapter config; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"{path / WEIGHTS_NAME}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    base_model.load_state_dict(tensors, strict=False)
    return base_model
