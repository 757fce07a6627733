"""The benchmark scripts run end to end on the tiny shape (their GPU suite's code path included).

They are scripts that print measured figures, not timed tests: these only check that every
variant builds, trains and is reported, so the GPU script is ready when a GPU is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the benchmarks compare against peft (pip install -e '.[bench]')")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=BENCH.parent, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_gpu_suite_code_path_reports_every_variant(tmp_path):
    run_script(
        "-m",
        "bench.step_time",
        *("--gpu-suite", "--device", "cpu", "--shape", "tiny", "--out-dir", str(tmp_path)),
        *("--rounds", "1", "--steps", "1", "--warmup", "1"),
    )
    results = json.loads((tmp_path / "results.json").read_text())
    eager = [r for r in results["results"] if r["mode"] == "eager"]
    assert eager, "no eager phase in the suite's results"
    for phase in eager:
        failed = {name: v["error"] for name, v in phase["variants"].items() if v.get("error")}
        assert not failed, failed
        assert {"floor", "peft_d05", "mosld", "loop_mosld"} <= set(phase["variants"])
        assert all(v["step_ms"] > 0 for v in phase["variants"].values())
    markdown = (tmp_path / "results.md").read_text()
    assert "loop-over-experts MoSLD (reference)" in markdown and "peft LoRA r=8, dropout 0.05" in markdown


def test_layer_bench_times_every_variant_and_counts_operators(tmp_path):
    out = tmp_path / "layer.json"
    stdout = run_script(
        "-m", "bench.layer_time", "--shape", "tiny", "--rounds", "2", "--calls", "1", "--json", str(out)
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"floor", "peft_d0", "peft_d05", "lora", "mosld", "loop_mosld"}
    assert rows["floor"]["trainable"] == 0 and rows["mosld"]["trainable"] > rows["lora"]["trainable"] > 0
    # the loop issues ops per expert; the fused layer a fixed handful per projection
    assert rows["loop_mosld"]["ops"] > 2 * rows["mosld"]["ops"] > 2 * rows["lora"]["ops"]
    assert "loop / mosld" in stdout


@pytest.mark.slow
def test_generation_throughput_bench_reports_bare_and_routed(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    stdout = run_script(
        "-m", "bench.generation_throughput", "--model", tiny_model_dir, "--quick", "--no-profile", "--out", str(out)
    )
    summary = json.loads(out.with_suffix(".json").read_text())["threads"]["1"]["summary"]
    assert set(summary) >= {"bare", "mosld"}
    for variant in ("bare", "mosld"):  # the same prompts and tokens decoded: positive, consistent timings
        figures = summary[variant]
        assert figures["decode_tokens_per_s"] > 0 and figures["total_s"] >= figures["decode_s"] > 0
    assert "ratio" in out.with_suffix(".md").read_text() and "mosld" in stdout
