"""Never lose a run, never accept nonsense: NaN, SIGTERM, resume overrides, early clear errors.

See docs/reliability.md for what each case is guaranteed. Runs use the tiny random Llama of
``conftest.tiny_model_dir`` and the example task, on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_training import tiny_run_args

from mosld.training.cli import main
from mosld.training.safety import PREEMPTED_EXIT_CODE


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"not valid JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def versions(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"))


# ---------------------------------------------------------------------------------------------- NaN


@pytest.mark.slow
def test_a_diverging_fit_stops_at_the_step_naming_the_cause_and_exports_no_adapter(tiny_model_dir, tmp_path, capsys):
    args = tiny_run_args(tiny_model_dir, tmp_path, "--trainer.max_steps", "10", "--model.learning_rate", "1e6")
    assert run_cli([*args, "--model.warmup", "0", "--trainer.gradient_clip_val", "0"]) == 1
    err = capsys.readouterr().err
    assert "error: training step " in err and "NaN" in err or "nan" in err, err[-2000:]
    assert "model.learning_rate = 1000000.0" in err and "no adapter was exported" in err
    assert "Traceback" not in err
    (run,) = versions(tmp_path)
    assert not (run / "adapter").exists()
    for file in run.rglob("*.json"):
        strict_json(file.read_text())


def test_json_written_by_the_callbacks_is_valid_even_with_nan():
    from mosld.training.callbacks import json_safe

    history = [{"val/acc": 0.5, "val/answer_loss": float("nan"), "scores": [float("-inf"), 1.0]}]
    text = json.dumps(json_safe(history), allow_nan=False)
    assert strict_json(text) == [{"val/acc": 0.5, "val/answer_loss": None, "scores": [None, 1.0]}]


# ------------------------------------------------------------------------------------------ SIGTERM


class WaitForSigterm(L.Callback):
    """After training step ``at_step``, writes ``marker`` and waits (at most a minute) for a SIGTERM."""

    def __init__(self, at_step: int, marker: str) -> None:
        self.at_step, self.marker = at_step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resuming_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    steps = ["--trainer.max_steps", "7", "--data.max_eval_examples", "2"]
    whole = main(tiny_run_args(tiny_model_dir, tmp_path / "whole", *steps))
    expected = load_file(Path(whole.trainer.log_dir) / "adapter" / "adapter_model.safetensors")

    # A real process, killed from outside while it trains (after step 3 of 7).
    root, marker = tmp_path / "preempted", tmp_path / "marker"
    waiter = ["--trainer.callbacks+=test_robustness.WaitForSigterm", "--trainer.callbacks.at_step=3"]
    cmd = [sys.executable, str(REPO / "main.py"), *tiny_run_args(tiny_model_dir, root, *steps), *waiter]
    cmd.append(f"--trainer.callbacks.marker={marker}")
    # as many threads as this process: another count sums in another order, which is not bit-identical
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": threads}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    (run,) = versions(root)
    checkpoint = run / "checkpoints" / "preempted.ckpt"
    assert checkpoint.is_file() and f"--ckpt_path {checkpoint}" in err
    assert f"--config {run / 'config.yaml'}" in err and "stopped after training step 3" in err
    assert not (run / "adapter").exists()  # a preempted run is not a finished one
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3

    resumed = main(tiny_run_args(tiny_model_dir, root, *steps, "--ckpt_path", str(checkpoint)))
    assert resumed.trainer.global_step == 7
    got = load_file(Path(resumed.trainer.log_dir) / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ after resuming, e.g. {different[:3]}"
