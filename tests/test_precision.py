"""``trainer.precision: auto``: bf16 only where the hardware computes it natively; explicit values win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import REPO, tiny_run_args

from mosld.training.cli import main
from mosld.training.precision import NATIVE_BF16_MAX_RATIO, AutoPrecisionTrainer, bf16_matmul_ratio, choose_precision

CHOICE = "from mosld.training.precision import choose_precision; c = choose_precision('cpu'); print(c.precision); print(c.reason)"


def choice_in_subprocess(env: dict[str, str]) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", CHOICE], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    precision, reason = done.stdout.strip().splitlines()[-2:]
    return precision, reason


def test_a_cpu_that_emulates_bf16_gets_fp32():
    # oneDNN and ATen capped at AVX2 compute bf16 as an AVX2-only CPU does (~30-60x slower than fp32)
    precision, reason = choice_in_subprocess({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert precision == "32-true", reason
    assert "bf16 emulated" in reason


def test_the_choice_here_follows_the_measured_bf16_speed():
    choice = choose_precision("cpu")
    native = bf16_matmul_ratio() < NATIVE_BF16_MAX_RATIO
    assert choice.precision == ("bf16-mixed" if native else "32-true"), choice.reason
    assert "probe took" in choice.reason


def test_an_explicit_precision_always_wins():
    trainer = AutoPrecisionTrainer(precision="32-true", accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.precision_choice is None and trainer.precision == "32-true"
    trainer = AutoPrecisionTrainer(precision="auto", accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.precision == choose_precision("cpu").precision and trainer.precision_choice is not None


def test_the_run_records_what_auto_chose_and_why(tiny_model_dir, tmp_path, capsys):
    cli = main(tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "2", "--trainer.precision", "auto"))
    run = Path(cli.trainer.log_dir)
    chosen = cli.trainer.precision
    assert chosen in ("bf16-mixed", "32-true")
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == chosen
    record = json.loads((run / "train_record.json").read_text())
    assert record["precision"] == chosen and record["precision_reason"].startswith("auto: the CPU has")
    assert f"trainer.precision auto -> {chosen}" in capsys.readouterr().err
