"""Quantized bases (bitsandbytes 4-bit and 8-bit on the CPU): loading, training, merging refused, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_run_args

import mosld
from mosld.models import load_base_model
from mosld.quantization import QuantizationConfig, is_quantized_layer
from mosld.training.cli import main

bnb = pytest.importorskip("bitsandbytes")


CONFIGS = {
    "nf4": QuantizationConfig(bits=4, quant_type="nf4"),
    "fp4": QuantizationConfig(bits=4, quant_type="fp4", double_quant=False),
    "int8": QuantizationConfig(bits=8),
}


@pytest.mark.parametrize(
    "fields,message",
    [({"bits": 3}, "bits: expected 4, 8"), ({"bits": 4, "quant_type": "int4"}, "quant_type"),
     ({"bits": 4, "compute_dtype": "float64"}, "compute_dtype")],
)  # fmt: skip
def test_bad_quantization_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantizationConfig(**fields)


def batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def adapted_copy(base: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(3)
    cfg = mosld.AdapterConfig(method="mosld", r=4, alpha=8, num_experts=(4, 3, 3, 2), shared_dropout=0.0)
    model = mosld.inject_adapters(base, cfg)
    for layer in mosld.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_adapters_wrap_quantized_projections_and_train(kind, tiny_model_dir):
    model = load_base_model(tiny_model_dir, quantization=CONFIGS[kind])
    adapted_copy(model).train()
    layers = mosld.adapter_layers(model)
    assert len(layers) == 8 and all(is_quantized_layer(layer.base_layer) for layer in layers.values())
    expected = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}[kind]
    assert {type(layer.base_layer).__name__ for layer in layers.values()} == {expected}
    data = batch(model.config.vocab_size)
    model.train()
    model(**data).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 8 * 3 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_nf4_gradients_equal_those_of_the_dequantized_weights_after_an_evaluation(tiny_model_dir):
    """Known answer: an NF4 base computes with its dequantized weights, forward and backward. A no-grad
    evaluation first, as a fit's sanity validation does (it used to switch bitsandbytes' CPU layer to a
    kernel without backward)."""
    quantized = load_base_model(tiny_model_dir, quantization=CONFIGS["nf4"])
    reference = load_base_model(tiny_model_dir)
    modules = dict(reference.named_modules())
    for name, module in quantized.named_modules():
        if is_quantized_layer(module):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            modules[name].weight.data.copy_(weight.float())
    data = batch(reference.config.vocab_size)
    results = []
    for base in (quantized, reference):
        model = adapted_copy(base)
        with torch.no_grad():
            model.eval()(**data)
        model.train()
        loss = model(**data).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (q_loss, q_grads), (r_loss, r_grads) = results
    torch.testing.assert_close(q_loss, r_loss, rtol=1e-5, atol=1e-5)
    assert q_grads.keys() == r_grads.keys()
    for name, grad in r_grads.items():
        assert q_grads[name] is not None, name
        torch.testing.assert_close(q_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_merging_into_a_quantized_base_is_refused_with_what_to_do(tiny_model_dir):
    model = load_base_model(tiny_model_dir, quantization=CONFIGS["nf4"])
    mosld.inject_adapters(model, mosld.AdapterConfig(method="lora", r=4, alpha=8))
    with pytest.raises(RuntimeError, match="cannot merge into a quantized base layer .Linear4bit.*unquantized base"):
        mosld.merge_adapters(model)
    assert not any(layer.merged for layer in mosld.adapter_layers(model).values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_cli_fit_on_a_quantized_base_round_trips_its_adapter(kind, tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    q = CONFIGS[kind]
    quant_args = ["--model.quantization.bits", str(q.bits), "--model.quantization.quant_type", q.quant_type]
    cli = main(tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "3", *quant_args))
    run = Path(cli.trainer.log_dir)
    assert cli.trainer.global_step == 3
    record = json.loads((run / "train_record.json").read_text())
    assert record["quantization"] == q.describe()
    saved = (run / "config.yaml").read_text()
    assert f"bits: {q.bits}" in saved
    # the adapter loads on the quantized base and on the full-precision one, with the same tensors
    trained = mosld.adapter_state_dict(cli.model.base)
    for quantization in (q, None):
        base = load_base_model(tiny_model_dir, quantization=quantization)
        loaded = mosld.adapter_state_dict(mosld.load_adapter(base, run / "adapter"))
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k].cpu(), trained[k].cpu()) for k in trained)
    # exported as a peft LoRA with fixed gates, it loads in peft on the unquantized base
    model = mosld.load_adapter(load_base_model(tiny_model_dir), run / "adapter").eval()
    data = batch(model.config.vocab_size)
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    gates = mosld.mean_gates(model, [inputs])
    folder = mosld.export_peft(model, tmp_path / "peft", gates)
    mosld.set_static_gates(model, gates)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = peft.PeftModel.from_pretrained(load_base_model(tiny_model_dir), str(folder)).eval()(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and the checkpoint resumes on the quantized base
    ckpt = run / "checkpoints" / "last.ckpt"
    more = main(
        tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "5", *quant_args, "--ckpt_path", str(ckpt))
    )
    assert more.trainer.global_step == 5


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


@pytest.mark.parametrize(
    "extra,message",
    [(["--trainer.strategy", "mosld.training.AdapterFSDPStrategy"], "model.quantization: FSDP cannot shard a 4-bit nf4"),
     (["--model.dtype", "float64"], "model.dtype: a quantized base computes in float32, bfloat16 or float16")],
)  # fmt: skip
def test_impossible_quantized_setups_are_refused_at_parse_time(extra, message, tiny_model_dir, tmp_path, capsys):
    args = tiny_run_args(tiny_model_dir, tmp_path, "--model.quantization.bits", "4", *extra)
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "lightning_logs").exists()
