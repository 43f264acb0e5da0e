#!/usr/bin/env bash
# GPU smoke test (issue 9): fit + attribute + plan on a Pythia-410m-shaped random-init model in bfloat16,
# printing the ratios of benchmarks/scale.py (fit and scoring time / training pass, measured / predicted
# peak memory from torch.cuda.max_memory_allocated). Sized for < 8 minutes on one recent GPU.
#
#   bash benchmarks/gpu_smoke.sh [OUT]        (OUT defaults to /tmp/msif-gpu-smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/msif-gpu-smoke}"
PY="${PYTHON:-python}"
if [ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_smoke.sh: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 1
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB")'

start=$(date +%s)
# the plan first: it reads only the config, so it also checks the probe before any GPU work
"$PY" benchmarks/probe.py --shape 410m --out "$OUT/410m" --documents 1000 --sft 64
msif plan "$OUT/410m/model" --corpus "$OUT/410m/corpus-1000.jsonl" --fit-examples 64 --finetune-examples 64 \
    --device cuda --dtype bfloat16 --batch-size 8 --calibrate
# fit (pt on the corpus, ft on the sft data), attribute over all 1000 documents, ratios against the plan
"$PY" benchmarks/scale.py --shapes 410m --documents 1000 --fit-examples 64 --batch-size 8 \
    --device cuda --dtype bfloat16 --out "$OUT" --json "$OUT/scale-410m.json"
echo "gpu_smoke.sh: done in $(( $(date +%s) - start )) s → $OUT/scale-410m.json"
