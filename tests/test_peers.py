"""The peer benchmark (``bench/peers``): MoE-PEFT's adapter tensors land in mosld and peft, and the
cross-check and the paired benchmark run end to end.

The end-to-end tests need MoE-PEFT's own environment (``bash bench/peers/setup_env.sh``, about 2
minutes and 1.4 GB), which CI does not build: they skip without it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model

from bench.peers.common import R
from bench.peers.compare import PEER_PYTHON, REPO
from bench.peers.crosscheck import load_peer_weights, peer_views
from bench.peers.mosld_side import apply

pytest.importorskip("peft", reason="the peer benchmark compares against peft (pip install -e '.[bench]')")

needs_peer = pytest.mark.skipif(
    not PEER_PYTHON.exists(), reason="MoE-PEFT's environment is not built (bash bench/peers/setup_env.sh)"
)


@pytest.mark.parametrize("variant", ["lora", "peft_lora", "mola"])
def test_peer_names_place_every_trainable_element_once(variant):
    model = apply(tiny_model("llama", dtype=torch.float32), variant)
    views = peer_views(model, variant)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    hits = {key: torch.zeros_like(p) for key, p in trainable.items()}
    for param, index in views.values():
        hits[id(param)][index] += 1
    assert all(bool((h == 1).all()) for h in hits.values()), "an element is placed twice or not at all"
    # each MoE-PEFT tensor comes back from where it was copied to
    weights = {k: torch.full(param[index].shape, float(i)) for i, (k, (param, index)) in enumerate(views.items())}
    load_peer_weights(views, weights)
    for key, (param, index) in views.items():
        assert torch.equal(param[index], weights[key]), key
    if variant == "mola":  # MoE-PEFT's expert E is rows E*r:(E+1)*r of mosld's stacked A
        name = next(k for k in views if k.endswith("experts.1.lora_A.weight"))
        assert views[name][1] == (slice(R, 2 * R),)
    with pytest.raises(KeyError, match="names differ"):
        load_peer_weights(views, dict(list(weights.items())[1:]))


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=REPO, check=False
    )


@pytest.mark.slow
@needs_peer
def test_crosscheck_agrees_where_the_definitions_do_and_shows_where_they_differ(tmp_path):
    out = tmp_path / "crosscheck.json"
    done = run_module("bench.peers.crosscheck", "--shape", "tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]  # every pair within tolerance, logits and gradients
    result = json.loads(out.read_text())
    for pair in ("lora_vs_lora", "lora_vs_lora_fused", "peft_lora_vs_lora", "mola_vs_mola"):
        assert result[pair]["adapter_effect_max_abs"] > 100 * result["logits_tolerance"], pair  # a real test
    assert result["mola_vs_mola"]["tokens_with_same_top2"] == 1.0
    # the differences docs/benchmarks.md lists ("Against MoE-PEFT"); a new MoE-PEFT may change them
    balance = result["balance_loss"]
    assert balance["mosld_formula_on_moe_peft_router_logits"] == pytest.approx(balance["mosld"], rel=1e-5)
    pooled = balance["top_k_x_mosld_formula_pooled_over_all_layers_on_mosld_router_logits"]
    assert balance["moe_peft"] == pytest.approx(pooled, rel=1e-4)
    assert result["lora_evaluator_rerun_max_abs_diff"] > 0 and result["mola_evaluator_rerun_max_abs_diff"] > 0
    probe = result["lora_fused_backward_probe"]
    assert probe["forward_max_abs_diff"] == 0 and probe["grad_rel_diff"]["lora_B"] < 1e-5
    assert probe["grad_rel_diff"]["lora_A"] > 0.01 and all(probe["grad_equals_mask_free_formula"].values())
    assert result["mola_train_after_inference_mode"].startswith("RuntimeError")


@pytest.mark.slow
@needs_peer
def test_paired_benchmark_runs_both_sides_and_reports_ratios(tmp_path):
    out = tmp_path / "peers.json"
    done = run_module(
        "bench.peers.compare",
        *("--shape", "tiny", "--seq", "32", "--rounds", "2", "--warmup", "1", "--out", str(out)),
        *("--mosld-variants", "floor,lora,mola", "--peer-variants", "floor,lora,mola"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = {k: v["error"] for k, v in result["variants"].items() if "error" in v}
    assert not failed, failed
    assert all(len(v["step_times_ms"]) == 2 and len(v["forward_times_ms"]) == 2 for v in result["variants"].values())
    assert {(p["mosld"], p["moe_peft"]) for p in result["pairs"]} == {
        ("floor", "floor"),
        ("lora", "lora"),
        ("mola", "mola"),
    }
    assert all(p["step"]["paired_median"] > 0 and p["peak_ratio"] > 0 for p in result["pairs"])
    assert result["machine"]["moe_peft"]["moe-peft"] == "2.0.2"
    assert "mosld / MoE-PEFT" in out.with_suffix(".md").read_text()
