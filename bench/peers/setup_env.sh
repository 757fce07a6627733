#!/usr/bin/env bash
# The peer's own virtual environment: MoE-PEFT 2.0.2 (and mixlora 0.2.3) on the project's torch.
#
#   bash bench/peers/setup_env.sh            # creates bench/peers/.venv (about 2.5 min, ~1.4 GB with torch)
#   TORCH=torch PEER_VENV=/tmp/peer bash bench/peers/setup_env.sh
#
# MoE-PEFT declares torch<2.6 and transformers<4.47. PyPI's torch of that range is the large CUDA
# build, so the peer is installed without its dependency resolution (--no-deps) on the torch the
# project uses (TORCH, default the Makefile's torch==2.13.0, which is the CPU wheel on our
# machines), with transformers inside MoE-PEFT's range and the few packages its modules import.
# What this changes for MoE-PEFT is recorded in docs/benchmarks.md ("Against MoE-PEFT").
# Never install MoE-PEFT into the project's .venv: its transformers pin would replace ours.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER_VENV=${PEER_VENV:-bench/peers/.venv}
TORCH=${TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

test -x "$PEER_VENV/bin/python" || "$PYTHON" -m venv "$PEER_VENV"
PY="$PEER_VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH"
# transformers inside MoE-PEFT's pin (>=4.44,<4.47); safetensors to read the shared base weights.
# One resolver run with datasets and evaluate (moe_peft/__init__ imports them through its
# dispatcher and tasks), so that they do not pull a huggingface-hub that transformers 4.46 refuses.
"$PY" -m pip install -q "transformers>=4.44,<4.47" "huggingface-hub<1.0" "safetensors>=0.4" packaging datasets evaluate
# The peer itself, without its pins. Its other declared dependencies (accelerate, sentencepiece,
# scikit-learn, tiktoken) serve its tokenizers and metrics, which the benchmark does not use.
"$PY" -m pip install -q --no-deps "moe-peft==2.0.2" "mixlora==0.2.3"
"$PY" - <<'PY'
import importlib.metadata as md
import torch, transformers
import moe_peft  # noqa: F401 - the import is the check
import mixlora  # noqa: F401
print("peer env ready:", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "moe-peft", "mixlora")))
PY
