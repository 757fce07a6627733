"""The adapter file format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Only adapter and router tensors are written, under their module names in the model. The JSON
records the adapter configuration, the experts of every adapted module, the base model's shape
and a SHA-256 of the weights file, so that loading onto a different base is refused with a
message saying what differs, and a truncated or altered weights file is detected.

Writing is atomic: both files go into a temporary folder beside the target, which is then
renamed into place, so a failure at any point leaves the previous adapter intact and never a
half-written one. Loading checks everything it reads before it touches the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from .config import AdapterConfig
from .inject import adapter_layers, adapter_parameter_names, adapter_state_dict, inject_adapters, num_decoder_layers
from .layer import base_shape

FORMAT = "mosld-adapter"
# 2: adapter_config.json records weights_sha256
FORMAT_VERSION = 2
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_META_FIELDS = {"adapter": dict, "base_model": dict, "modules": dict}


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


def non_finite_tensors(tensors: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _replace_folder(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``; an existing ``target`` is moved aside first and restored on failure."""
    if not target.exists():
        staged.rename(target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
    aside.rmdir()
    target.rename(aside)
    try:
        staged.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_adapter(model: nn.Module, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter of ``model`` into the folder ``path``, atomically.

    Args:
        model: A model with injected adapters.
        path: Output folder: absent, empty, or holding an adapter (which is replaced).
        state_dict: The adapter tensors to write, by the same names as ``adapter_state_dict(model)``
            (for strategies such as FSDP that gather full tensors separately); default: the model's.

    Returns:
        The folder written.

    Raises:
        ValueError: no adapters, merged adapters, names that differ from the model's, non-finite
            values (a diverged run is never saved as an adapter), or a folder holding other files.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no adapters (call mosld.inject_adapters first)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("save_adapter: unmerge the adapters first (mosld.unmerge_adapters)")
    config: AdapterConfig = model.adapter_config
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_adapter: {path} is a file, expected a folder")
    others = (
        sorted(p.name for p in path.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME)) if path.exists() else []
    )
    if others:
        raise ValueError(
            f"save_adapter: {path} holds other files ({', '.join(others[:5])}); the adapter folder is replaced "
            "as a whole, so give an empty or new folder, or one that holds only an adapter"
        )
    if state_dict is None:
        state_dict = adapter_state_dict(model)
    expected = adapter_parameter_names(model)
    if set(state_dict) != set(expected):
        raise ValueError(
            f"save_adapter: state_dict names differ from the model's adapters "
            f"(e.g. {sorted(set(state_dict) ^ set(expected))[:3]})"
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    broken = non_finite_tensors(tensors)
    if broken:
        raise ValueError(
            f"save_adapter: {len(broken)} of {len(tensors)} adapter tensors hold NaN or infinity "
            f"(e.g. {broken[:3]}); a diverged adapter is not saved"
        )
    weights = save_safetensors(tensors, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": config.to_dict(),
        "base_model": base_model_signature(model),
        "modules": {
            name: {"in_features": m.in_features, "out_features": m.out_features, "num_experts": m.num_experts}
            for name, m in layers.items()
        },
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (staged / WEIGHTS_NAME).write_bytes(weights)
        (staged / CONFIG_NAME).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
        for file in staged.iterdir():  # on disk before the rename makes them the adapter
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        staged.chmod(0o755)  # mkdtemp makes it private to the user
        _replace_folder(staged, path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return path


def read_adapter_config(path: str | Path) -> dict:
    """The parsed ``adapter_config.json`` of an adapter folder, checked for format, version and fields."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config (expected {CONFIG_NAME} beside {WEIGHTS_NAME})")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version!r} is not one this mosld reads (1..{FORMAT_VERSION})")
    for field, kind in _META_FIELDS.items():
        if not isinstance(meta.get(field), kind):
            raise ValueError(f"{file}: field {field!r} should be a JSON object, got {meta.get(field)!r:.80}")
    for name, shape in meta["modules"].items():
        if not isinstance(shape, dict) or not all(
            isinstance(shape.get(k), int) for k in ("in_features", "out_features")
        ):
            raise ValueError(f"{file}: field 'modules' entry {name!r} should hold integer in_features and out_features")
    if version >= 2 and not isinstance(meta.get("weights_sha256"), str):
        raise ValueError(f"{file}: field 'weights_sha256' is missing (format_version {version} records it)")
    return meta


def _skeleton(model: nn.Module) -> nn.Module:
    """A weightless copy of ``model``'s architecture (meta device), to inject into for checking."""
    config = getattr(model, "config", None)
    if config is not None:
        try:
            with torch.device("meta"):
                return type(model)(config)
        except Exception:  # not constructible from its config: check on a full copy
            pass
    import copy

    return copy.deepcopy(model)


def _base_differences(meta: dict, base_model: nn.Module) -> list[str]:
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
        try:  # from the layer's own fields: a quantized weight is packed into another shape
            d_in, d_out = base_shape(getattr(module, "base_layer", module))
        except TypeError:
            d_in, d_out = None, None
        if (d_in, d_out) != (shape["in_features"], shape["out_features"]):
            differences.append(
                f"module {name}: adapter expects {shape['in_features']} -> {shape['out_features']}, "
                f"base layer is {f'{d_in} -> {d_out}' if d_in is not None else type(module).__name__}"
            )
    return differences


def _read_weights(path: Path, meta: dict) -> dict[str, Tensor]:
    """The tensors of the weights file, after checking the file against the recorded checksum."""
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter weights (expected {WEIGHTS_NAME} beside {CONFIG_NAME})")
    data = file.read_bytes()
    recorded = meta.get("weights_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise ValueError(
            f"{file}: the file is truncated, corrupt or altered: its SHA-256 differs from the one recorded in "
            f"{CONFIG_NAME} ({len(data):,} bytes read); save the adapter again or restore a good copy"
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from None


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved in ``path`` into a freshly loaded stock ``base_model``.

    Everything read is checked first (the config and its fields, the base model's shape, the
    weights file against its recorded SHA-256, tensor names, shapes, dtypes and finiteness);
    only then is the model changed, so on any error ``base_model`` is left as it was.

    Raises:
        FileNotFoundError: a file of the adapter is missing.
        ValueError: the base model differs from the one the adapter was trained on (hidden
            size, layer count, model type, vocabulary, or an adapted module missing or of
            another shape; the message lists every difference), the base already has adapters,
            or a file is malformed, truncated, altered or holds other tensors than its config says.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    if adapter_layers(base_model):
        raise ValueError(f"load_adapter: the model already has adapters; load {path} into a fresh base model")
    differences = _base_differences(meta, base_model)
    if differences:
        actual = base_model_signature(base_model)
        raise ValueError(
            f"adapter {path} does not fit this base model ({actual['name_or_path'] or type(base_model).__name__}; "
            f"trained on {meta['base_model'].get('name_or_path') or 'unknown'}):\n  " + "\n  ".join(differences)
        )
    try:
        config = AdapterConfig.from_dict(meta["adapter"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_NAME}: field 'adapter': {err}") from None
    skeleton = inject_adapters(_skeleton(base_model), config)
    own = adapter_state_dict(skeleton)
    file = path / WEIGHTS_NAME
    tensors = _read_weights(path, meta)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{file}: tensors do not match the adapter config; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{file}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        if own[key].dtype != value.dtype:
            raise ValueError(
                f"{file}: {key} has dtype {value.dtype}, expected {own[key].dtype} "
                f"(adapter_dtype {config.adapter_dtype!r} in {CONFIG_NAME})"
            )
    declared = {name: m.get("num_experts") for name, m in meta["modules"].items()}
    built = {name: m.num_experts for name, m in adapter_layers(skeleton).items()}
    if declared != built and all(v is not None for v in declared.values()):
        wrong = sorted(n for n in set(declared) | set(built) if declared.get(n) != built.get(n))
        raise ValueError(f"{path / CONFIG_NAME}: field 'modules' disagrees with field 'adapter' at {wrong[:3]}")
    broken = non_finite_tensors(tensors)
    if broken:
        raise ValueError(f"{file}: {len(broken)} tensors hold NaN or infinity (e.g. {broken[:3]})")
    inject_adapters(base_model, config)
    base_model.load_state_dict(tensors, strict=False)
    return base_model
