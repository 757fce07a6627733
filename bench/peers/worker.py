"""One side of the peer benchmark in its own process and environment, driven by ``bench.peers.compare``.

The two sides cannot share a process (MoE-PEFT needs transformers < 4.47, mosld runs on 5.x), so
the coordinator starts one worker per side and sends them JSON commands, one per line on stdin,
interleaving the sides' steps round by round; each reply is one JSON line on stdout (everything
the libraries print goes to stderr). Both workers stay alive for the whole run, and only one of
them computes at a time: the other waits on its stdin.

    python -m bench.peers.worker --side mosld            # the project's environment
    bench/peers/.venv/bin/python -m bench.peers.worker --side moe_peft
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import traceback

import torch

from bench.memory import CpuMemory, SavedTensors
from bench.peers.common import Variant, sync, timed

SIDES = {"mosld": "bench.peers.mosld_side", "moe_peft": "bench.peers.moe_peft_side"}


class Worker:
    def __init__(self, side: str) -> None:
        self.side = side
        self.builder = importlib.import_module(SIDES[side])
        self.variants: dict[str, Variant] = {}
        self.settings: dict = {}
        self.ids: torch.Tensor | None = None
        self.cpu_memory = CpuMemory()

    # ------------------------------------------------------------------ commands
    def init(self, threads: int, device: str, dtype: str, config: dict, weights: str, seed: int = 0, **options) -> dict:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self.cpu_memory.keep_freed_memory()
        self.settings = dict(config=config, weights=weights, dtype=getattr(torch, dtype), device=self.device, **options)
        self.seed = seed
        return versions(self.side, self.device)

    def build(self, variant: str) -> dict:
        torch.manual_seed(self.seed)  # the same adapter initialisation draws on every run
        built = self.builder.build(variant, **self.settings)
        self.variants[variant] = built
        return {"label": built.label, "trainable": built.trainable}

    def set_ids(self, ids: list[list[int]]) -> dict:
        self.ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return {"tokens": self.ids.numel()}

    def warmup(self, variant: str, steps: int) -> dict:
        """``steps - 1`` untimed training steps, then the memory step (as ``bench.runner``'s warm-up)."""
        built = self.variants[variant]
        for _ in range(steps - 1):
            built.train_step(self.ids)
        built.forward(self.ids)
        sync(self.device)
        return self.measure_memory(built)

    def measure_memory(self, built: Variant) -> dict:
        """Resident bytes + the peak growth of one training step, and the bytes saved for backward."""
        resident = built.resident()
        # MoE-PEFT's weights are not parameters of a module, so both sides name what to leave out
        saved = SavedTensors(torch.nn.Module(), exclude=[*built.parameters, *built.held()])
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            if self.device.type == "cuda":
                gc.collect()
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                built.train_step(self.ids)
                sync(self.device)
                growth = torch.cuda.max_memory_allocated(self.device) - before
            else:
                before = self.cpu_memory.start()
                built.train_step(self.ids)
                growth = max(0, self.cpu_memory.peak() - before)
        return {"resident": resident, "step_growth": growth, "peak": resident + growth, "saved": saved.total}

    def step(self, variant: str) -> dict:
        built = self.variants[variant]
        measure, wall = timed(lambda: built.train_step(self.ids), self.device)
        return {"time": measure, "wall": wall}

    def forward(self, variant: str) -> dict:
        built = self.variants[variant]
        measure, wall = timed(lambda: built.forward(self.ids), self.device)
        return {"time": measure, "wall": wall}

    def call(self, function: str, **kwargs) -> object:
        """Run ``bench.peers.<module>.<function>(worker=self, **kwargs)`` (the cross-check's steps)."""
        module, name = function.rsplit(".", 1)
        return getattr(importlib.import_module(f"bench.peers.{module}"), name)(worker=self, **kwargs)


def versions(side: str, device: torch.device) -> dict:
    import importlib.metadata as md

    packages = ("torch", "transformers", "peft") if side == "mosld" else ("torch", "transformers", "moe-peft")
    info = {"python": platform.python_version(), "side": side, "device": device.type}
    for package in packages:
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def serve(side: str) -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # library prints must not corrupt the replies
    worker = Worker(side)
    with replies:
        for line in sys.stdin:
            request = json.loads(line)
            command = request.pop("command")
            if command == "quit":
                break
            try:
                result = getattr(worker, command)(**request)
                reply = {"ok": True, "result": result}
            except Exception as err:  # noqa: BLE001 - reported to the coordinator, which goes on
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                print(reply["traceback"], file=sys.stderr, flush=True)
            replies.write(json.dumps(reply) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=tuple(SIDES), required=True)
    serve(parser.parse_args(argv).side)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
