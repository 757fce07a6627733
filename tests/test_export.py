"""Fixed gates and the export of any mixture as a standard peft LoRA adapter (docs/serving.md)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import EMBEDDED, REPO, copy_of_example_task, tiny_model

import mosld
from mosld.adapters.static import routed_layers

peft = pytest.importorskip("peft")

ARCHS = ["llama", "qwen2", "gpt2"]
ALL_METHODS = ["lora", "mola", "mosl", "mosld", "share_b"]
TOLERANCE = 1e-5  # float32 logits


def targets(arch: str) -> tuple[str, ...]:
    return ("c_attn", "c_fc") if arch == "gpt2" else ("q_proj", "v_proj", "up_proj")


def adapted(arch: str, method: str) -> torch.nn.Module:
    """A float32 tiny model whose adapter and router tensors are all random (B is zero after injection)."""
    experts = 1 if method == "lora" else (4, 3, 3, 2)
    cfg = mosld.AdapterConfig(method=method, r=4, alpha=8, target_modules=targets(arch), num_experts=experts)
    model = mosld.inject_adapters(tiny_model(arch, dtype=torch.float32), cfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if mosld.adapters.is_adapter_parameter(name):
            torch.nn.init.normal_(p, std=0.3)
    return model


def batch(lengths=(7, 4, 6), vocab: int = 64, seed: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded random sequences with their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[inputs["attention_mask"].bool()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_peft_adapter_equals_mixture_with_fixed_gates_and_merges(arch, method, tmp_path):
    model = adapted(arch, method)
    gates = mosld.mean_gates(model, [batch(seed=3), batch((5, 5), seed=4)])
    assert set(gates) == set(routed_layers(model)) and (method == "lora") == (not gates)
    folder = mosld.export_peft(model, tmp_path / "peft", gates or None)

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == f"tiny-{arch}"
    assert config["target_modules"] == list(targets(arch))
    if method == "mola":  # rank N * r: the experts' counts differ by layer, so do ranks and alphas
        assert config["r"] == 12 and config["lora_alpha"] == 24
        assert set(config["rank_pattern"].values()) == {16, 8} and set(config["alpha_pattern"].values()) == {32, 16}
    else:
        assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (4, 8, {}, {})

    inputs = batch(seed=5)
    routed = logits(model, inputs)
    mosld.set_static_gates(model, gates)
    expected = logits(model, inputs)
    if method != "lora":
        assert (expected - routed).abs().max() > 1e-3  # fixed gates do change the model

    stock = tiny_model(arch, dtype=torch.float32)
    base_only = logits(stock, inputs)
    loaded = peft.PeftModel.from_pretrained(stock, str(folder)).eval()
    got = logits(loaded, inputs)
    assert (expected - base_only).abs().max() > 1e-2  # the adapter matters, so a misnamed tensor could not pass
    assert (got - expected).abs().max() <= TOLERANCE

    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert (logits(merged, inputs) - expected).abs().max() <= TOLERANCE


def test_fixed_one_hot_gates_select_one_expert_and_none_restores_routing():
    model = adapted("llama", "mosld")
    inputs = batch()
    routed = logits(model, inputs)
    layers = routed_layers(model)
    one_hot = {name: torch.eye(layer.num_experts)[1] for name, layer in layers.items()}
    mosld.set_static_gates(model, one_hot)
    name, layer = next(iter(layers.items()))
    x = torch.randn(3, layer.in_features)
    r = layer.r
    expert_1 = layer.scaling * x @ layer.lora_A.t() @ layer.lora_B[:, r : 2 * r].t()
    assert torch.allclose(layer.adapter_delta(x), expert_1, atol=1e-6), name
    mosld.set_static_gates(model, None)
    assert all(layer.static_gates is None for layer in layers.values())
    assert torch.equal(logits(model, inputs), routed)


def test_mean_gates_are_the_mean_top_k_gates_over_real_tokens_only():
    model = adapted("qwen2", "mola")
    padded = batch((7, 3), seed=6)
    gates = mosld.mean_gates(model, [padded])
    # The same tokens without padding, one sequence per forward, weigh the same: same means.
    singles = [{"input_ids": padded["input_ids"][i : i + 1, :n]} for i, n in enumerate((7, 3))]
    unpadded = mosld.mean_gates(model, singles)
    # Counting the padding positions as tokens changes them.
    with_padding = mosld.mean_gates(model, [{"input_ids": padded["input_ids"]}])
    some = next(iter(gates))
    for name, g in gates.items():
        assert g.shape == (routed_layers(model)[name].num_experts,) and (g >= 0).all()
        assert abs(g.sum().item() - 1) < 1e-6
        assert torch.allclose(g, unpadded[name], atol=1e-6), name
    assert not torch.allclose(gates[some], with_padding[some], atol=1e-4)
    # One token: its own top-k gates, exactly k non-zeros (not the full softmax).
    one = mosld.mean_gates(model, [{"input_ids": padded["input_ids"][:1, :1]}])
    assert all(int((g > 0).sum()) == routed_layers(model)[n].top_k for n, g in one.items())


def test_mean_gates_leave_the_models_mode_and_fixed_gates_as_they_were():
    model = adapted("llama", "mosl").train()
    fixed = {
        name: torch.full((layer.num_experts,), 1 / layer.num_experts) for name, layer in routed_layers(model).items()
    }
    mosld.set_static_gates(model, fixed)
    measured = mosld.mean_gates(model, [batch()])
    assert model.training
    some = next(iter(measured))
    assert not torch.allclose(measured[some], fixed[some])  # the router's, not the fixed ones
    assert all(torch.equal(layer.static_gates, fixed[n]) for n, layer in routed_layers(model).items())


def bad_gates(model, change: str) -> dict:
    gates = {
        name: torch.full((layer.num_experts,), 1 / layer.num_experts) for name, layer in routed_layers(model).items()
    }
    first = next(iter(gates))
    if change == "missing":
        del gates[first]
    elif change == "unknown":
        gates["model.layers.0.mlp.down_proj"] = torch.tensor([1.0])
    elif change == "length":
        gates[first] = torch.tensor([0.5, 0.5])
    elif change == "negative":
        gates[first] = torch.tensor([1.2, -0.2, 0.0, 0.0])
    elif change == "sum":
        gates[first] = torch.tensor([0.3, 0.3, 0.3, 0.0])
    return gates


@pytest.mark.parametrize(
    "change,message",
    [
        ("missing", "missing model.layers.0.self_attn.q_proj"),
        ("unknown", "not routed modules of this model model.layers.0.mlp.down_proj"),
        ("length", "gates[model.layers.0.self_attn.q_proj]: expected 4 values (one per expert), got shape (2,)"),
        ("negative", "gates[model.layers.0.self_attn.q_proj]: expert 1 has gate -0.2"),
        ("sum", "gates[model.layers.0.self_attn.q_proj]: sum to 0.9, expected 1"),
    ],
)
def test_bad_gates_are_refused_naming_the_module(change, message, tmp_path):
    model = adapted("llama", "mosld")
    gates = bad_gates(model, change)
    with pytest.raises(ValueError) as err:
        mosld.set_static_gates(model, gates)
    assert message in str(err.value)
    with pytest.raises(ValueError) as err:
        mosld.export_peft(model, tmp_path / "out", gates)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_folder_and_a_routed_model_without_gates(tmp_path):
    model = adapted("llama", "mosld")
    gates = mosld.mean_gates(model, [batch()])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="used exists and is not an empty folder"):
        mosld.export_peft(model, tmp_path / "used", gates)
    assert (tmp_path / "used" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="gates are required for a routed mixture"):
        mosld.export_peft(model, tmp_path / "new")
    (tmp_path / "empty").mkdir()
    assert (mosld.export_peft(model, tmp_path / "empty", gates) / "adapter_model.safetensors").is_file()
    recorded = json.loads((tmp_path / "empty" / "gates.json").read_text())
    assert recorded["method"] == "mosld"
    mosld.set_static_gates(model, recorded["gates"])  # the record is accepted back as gates
    assert all(torch.equal(layer.static_gates, gates[n]) for n, layer in routed_layers(model).items())


def load_script():
    spec = importlib.util.spec_from_file_location("export_peft_script", REPO / "scripts" / "export_peft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_command_writes_one_adapter_per_task_and_the_mixture(tiny_model_dir, tmp_path, capsys):
    from mosld.training.cli import main as cli_main

    example = str(REPO / "data" / "example_task")
    quiz = copy_of_example_task(tmp_path / "quiz")  # a second task: each task's own gates are scored apart
    cli = cli_main(
        ["fit", "--config", str(REPO / "configs" / "mosld.yaml"), "--model.model_name_or_path", tiny_model_dir,
         "--data.tasks", f"[{example}, {quiz}]", "--data.max_eval_examples", "4", "--data.num_samples_per_epoch", "8",
         "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.precision", "32-true",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps",
         "0"]
    )  # fmt: skip
    run = Path(cli.trainer.log_dir)
    script = load_script()
    summary = script.main([str(run), "--train-items", "6", "--batch-size", "4", "--verify", "--eval-limit", "4"])
    out = run / "peft"
    assert sorted(p.name for p in out.iterdir()) == ["example_task", "gates.json", "mixture", "quiz"]
    for name in ("example_task", "mixture"):
        assert json.loads((out / name / "adapter_config.json").read_text())["peft_type"] == "LORA"
        diffs = summary["adapters"][name]["max_abs_logit_diff"]
        assert diffs["peft"] <= TOLERANCE and diffs["merged"] <= TOLERANCE
    recorded = json.loads((out / "gates.json").read_text())
    assert recorded["train_items"] == 6 and set(recorded["adapters"]) == {"example_task", "quiz", "mixture"}
    # the same items in both tasks: the mixture's gates are the mean of two equal gate vectors
    mixture, task = recorded["adapters"]["mixture"]["gates"], recorded["adapters"]["example_task"]["gates"]
    assert all(mixture[m] == pytest.approx(task[m]) for m in task)
    printed = capsys.readouterr().out
    assert "| example_task | 4 |" in printed and "| quiz | 4 |" in printed and "routed - per-task gates:" in printed
    rows = recorded["accuracy"]
    for fixed in ("task_gates", "mixture_gates"):  # paired item by item: the interval holds the difference
        paired = recorded["paired"][fixed]
        assert paired["items"] == 8 and paired["tasks"] == 2 and paired["low"] <= paired["diff"] <= paired["high"]
        assert paired["diff"] == pytest.approx(100 * sum(r["routed"] - r[fixed] for r in rows) / 2)
    # the earlier export's gates scored again, the mixture's only: the same accuracies, nothing exported
    again = script.main([str(run), "--gates", str(out / "gates.json"), "--eval-limit", "4", "--fixed-gates",
                         "mixture", "--out", str(run / "accuracy")])  # fmt: skip
    assert [(r["routed"], r["mixture_gates"], r["task_gates"]) for r in again["accuracy"]] == [
        (r["routed"], r["mixture_gates"], None) for r in rows
    ]
    assert set(again["paired"]) == {"mixture_gates"} and sorted(p.name for p in (run / "accuracy").iterdir()) == [
        "gates.json"
    ]
    with pytest.raises(SystemExit):  # the output exists now: refused
        script.main([str(run)])
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_embedded_smollm2_export_equals_fixed_gates(dtype, tmp_path, tokenizer):
    from mosld.models import load_base_model

    cfg = mosld.AdapterConfig(method="mosld", r=8, alpha=16, num_experts=(8, 6, 4, 2), adapter_dtype=dtype)
    model = mosld.inject_adapters(load_base_model(EMBEDDED, dtype=dtype), cfg).eval()
    torch.manual_seed(0)
    for layer in mosld.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    texts = ["Q: Which gas do plants take in?\nA: carbon dioxide", "The sun is a star."]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    gates = mosld.mean_gates(model, [inputs])
    folder = mosld.export_peft(model, tmp_path / "peft", gates)
    mosld.set_static_gates(model, gates)
    expected = logits(model, inputs)
    stock = load_base_model(EMBEDDED, dtype=dtype)
    assert (logits(stock, inputs) - expected).abs().max() > 0.1
    loaded = peft.PeftModel.from_pretrained(stock, str(folder)).eval()
    unmerged = logits(loaded, inputs)
    merged = logits(loaded.merge_and_unload(), inputs)
    if dtype == "float64":
        assert (unmerged - expected).abs().max() <= 1e-10 and (merged - expected).abs().max() <= 1e-10
    else:
        # 30 layers in float32 with logits up to ~35: ~4e-5 of rounding, as between peft's own merged and
        # unmerged model (docs/serving.md); 1e-5 holds on the 4-layer models above.
        noise = (merged - unmerged).abs().max()
        assert (unmerged - expected).abs().max() <= max(1e-4, 2 * noise)
        assert (merged - expected).abs().max() <= max(1e-4, 2 * noise)


BAD_GATES_FILES = ("not json", json.dumps({"gates": {}}), json.dumps({"adapters": {"mixture": {"gates": [1]}}}))


def test_an_exports_gates_file_is_read_back_and_anything_else_refused_naming_the_file(tmp_path):
    from mosld.adapters.export import read_export_gates

    good = tmp_path / "gates.json"
    good.write_text(json.dumps({"run": "r", "adapters": {"mixture": {"gates": {"m": [0.25, 0.75]}}}}))
    gates, record = read_export_gates(good)
    assert torch.equal(gates["mixture"]["m"], torch.tensor([0.25, 0.75])) and record["run"] == "r"
    for text in BAD_GATES_FILES:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{bad}: expected a gates.json written by scripts/export_peft")):
            read_export_gates(bad)
