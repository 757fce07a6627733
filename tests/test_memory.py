"""The memory planner (mosld.tools.memory): weights, activations and quantized bytes against real tiny models."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import DEFAULT_CONFIG, tiny_config
from transformers import AutoModelForCausalLM

import mosld
from bench.memory import SavedTensors
from mosld.models import load_base_model
from mosld.quantization import QuantizationConfig
from mosld.tools.memory import (
    KNOWN_ARCHITECTURES,
    _quantized_linears,
    main,
    meta_base,
    plan,
    quantized_linear_bytes,
    saved_bytes,
    weight_bytes,
)

ADAPTER = {"r": 4, "alpha": 8, "target_modules": ("q_proj", "v_proj", "up_proj")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Llama at hidden size 64 (bitsandbytes' CPU 4-bit kernels quantize blocks of 64 inputs)."""
    folder = tmp_path_factory.mktemp("tiny-llama-memory")
    config = tiny_config("llama", vocab_size=128, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def adapted_meta(model_dir: str, method: str) -> torch.nn.Module:
    model = meta_base(model_dir, torch.float32)
    model.requires_grad_(False)
    return mosld.inject_adapters(model, mosld.AdapterConfig(method=method, **ADAPTER)).train()


def stored_bytes(model: torch.nn.Module) -> int:
    """Every storage a (possibly bitsandbytes-quantized) model holds, counted once: parameters, buffers,
    4-bit quantization states (block scales, codes, nested scales) and 8-bit row scales."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
        if getattr(p, "SCB", None) is not None:
            tensors.append(p.SCB)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("method", ["lora", "mosld"])
def test_weight_bytes_equal_the_loaded_fp32_model(model_dir, method):
    real = mosld.inject_adapters(load_base_model(model_dir), mosld.AdapterConfig(method=method, **ADAPTER))
    trainable = sum(p.numel() * 4 for p in real.parameters() if p.requires_grad)
    predicted = plan(adapted_meta(model_dir, method), QuantizationConfig(), 2, 16, 2, checkpointing=False)
    assert predicted.weights == stored_bytes(real) - trainable
    assert predicted.adapter_params == trainable
    assert predicted.optimizer == 2 * trainable


@pytest.mark.parametrize("method", ["lora", "mosld"])
def test_meta_activations_match_the_cpu_forward(model_dir, method):
    """CPU attention here is SDPA's fused flash kernel (no mask, fp32): it saves q, k, v, output and the
    logsumexp, which the planner's meta attention saves too, so the counts agree to the byte."""
    batch, seq, answer = 2, 32, 3
    torch.manual_seed(0)
    model = mosld.inject_adapters(load_base_model(model_dir), mosld.AdapterConfig(method=method, **ADAPTER)).train()
    ids = torch.randint(0, 128, (batch, seq))
    saved = SavedTensors(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        logits = model(input_ids=ids, logits_to_keep=answer).logits
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, :answer].flatten())
    predicted = saved_bytes(adapted_meta(model_dir, method), batch, seq, answer)
    total = predicted.outside + sum(predicted.layers)
    assert abs(total - saved.total) <= 0.02 * saved.total, (total, saved.total)
    assert all(b > 0 for b in predicted.layers)


@pytest.mark.parametrize("quantization", [{"bits": 4}, {"bits": 4, "double_quant": False}, {"bits": 8}])
def test_quantized_weight_bytes_match_bitsandbytes(model_dir, quantization):
    pytest.importorskip("bitsandbytes")
    config = QuantizationConfig.from_value(quantization)
    real = load_base_model(model_dir, quantization=config)
    predicted = weight_bytes(meta_base(model_dir, torch.float32), config)
    assert predicted == stored_bytes(real)
    assert predicted < weight_bytes(meta_base(model_dir, torch.float32), QuantizationConfig())


def test_quantized_linear_formula():
    nf4 = QuantizationConfig(bits=4, double_quant=False)
    # 4096 x 4096: 8 Mi weights -> 4 MiB packed, 128 Ki fp32 block scales, the 16-entry code
    assert quantized_linear_bytes(4096, 4096, nf4) == 2**23 + 4 * 2**18 + 64
    assert quantized_linear_bytes(4096, 4096, QuantizationConfig(bits=8)) == 2**24 + 4 * 4096


def test_checkpointing_lowers_the_predicted_activations(model_dir):
    model = adapted_meta(model_dir, "mosld")
    plain = plan(model, QuantizationConfig(), 4, 64, 4, checkpointing=False)
    checkpointed = plan(model, QuantizationConfig(), 4, 64, 4, checkpointing=True)
    assert checkpointed.activations < plain.activations
    assert checkpointed.weights == plain.weights and checkpointed.adapter == plain.adapter


def test_llama2_7b_table_has_its_parameter_count():
    model = meta_base("meta-llama/Llama-2-7b-hf", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert KNOWN_ARCHITECTURES["meta-llama/Llama-2-7b-hf"]["num_hidden_layers"] == 32


def test_cli_prints_the_table(capsys):
    result = main(["--config", DEFAULT_CONFIG, "--batch", "2", "--seq", "32", "--model.quantization.bits", "4"])
    out = capsys.readouterr().out
    assert "| weights (frozen base) |" in out and "| total |" in out and "4-bit nf4" in out
    assert result.total == result.weights + result.adapter + result.activations + result.transient > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.dtype", "float8"], 'Parser key "model.dtype"'),
        (["--model.model_name_or_path", "org/unknown-model"], "--model-config"),
        (["--config", "no/such.yaml"], 'Parser key "config": File does not exist'),
        # read by the training command line's parser: what it refuses, refused with its message
        (["--data.batch_size", "0"], 'Parser key "data.batch_size":\n  Not of type PositiveInt: 0'),
        (["--model.adapter.r", "0"], "model.adapter.r: expected an integer >= 1, got 0"),
        (["--model.adapter.target_modules", "[nowhere]"], "model.adapter.target_modules: 'nowhere' matches no module"),
        (["--model.no_such_option", "1"], "unrecognized arguments: --model.no_such_option 1"),
    ],
)
def test_cli_names_the_bad_option(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["--config", DEFAULT_CONFIG, "--batch", "1", "--seq", "8", *args])
    assert message in capsys.readouterr().err


def test_bench_table_puts_the_planner_beside_the_measured_peak():
    from bench.memory_table import markdown, predicted_peak

    args = argparse.Namespace(batch=2, seq=16, answer_tokens=2)
    row = dict(base="fp32", method="lora", checkpointing=True, device="cpu", trainable=1, resident=0, saved=0)
    row |= dict(before_step=0, step_growth=0)
    row["peak"] = predicted_peak(row, args)
    assert row["peak"] > 0
    assert "| +0.0% |" in markdown([row], args)
    row["peak"] = row["peak"] // 2
    assert "| +100.0% |" in markdown([row], args)


def test_int8_counts_the_inputs_bitsandbytes_keeps(model_dir):
    """On a CPU bitsandbytes' 8-bit matmul keeps its input for backward outside autograd's saved tensors."""
    model = adapted_meta(model_dir, "lora")
    fp32 = plan(model, QuantizationConfig(), 2, 16, 2, checkpointing=False)
    int8 = plan(model, QuantizationConfig(bits=8), 2, 16, 2, checkpointing=False)
    nf4 = plan(model, QuantizationConfig(bits=4), 2, 16, 2, checkpointing=False)
    assert int8.activations > fp32.activations == nf4.activations
    # held outside autograd's saved tensors, those inputs escape checkpointing too
    held = saved_bytes(model, 2, 16, 2, held_inputs=_quantized_linears(model)).held
    assert held > 0
    fp32_ckpt = plan(model, QuantizationConfig(), 2, 16, 2, checkpointing=True)
    assert (
        plan(model, QuantizationConfig(bits=8), 2, 16, 2, checkpointing=True).activations
        >= fp32_ckpt.activations + held
    )
