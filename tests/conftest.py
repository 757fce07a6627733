"""Fixtures: the test tokenizer, the benchmark data folder, a tiny model saved like a hub checkpoint.

Helpers (tiny models, paths) live in ``helpers.py``; the names re-exported here keep older
``from conftest import ...`` lines working.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import EMBEDDED, EXAMPLE_TASK, REPO, SHARED_DATA, TEST_TOKENIZER, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from mosld.models import load_tokenizer

__all__ = ["EMBEDDED", "EXAMPLE_TASK", "REPO", "SHARED_DATA", "TEST_TOKENIZER", "tiny_config", "tiny_model"]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TEST_TOKENIZER)


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
    config = tiny_config("llama", vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
