#!/usr/bin/env bash
# Distributed GPU check (issue 10): on every visible GPU (nccl, one rank per GPU), a Pythia-160m-shaped
# random-init model is fitted and a corpus scored with 1 rank and with all ranks; the 1-rank and
# N-rank factors are compared (relative difference of the Λ sums and eigenvalues, float32) and the
# times printed as ratios. Sized for a few minutes on 2-8 recent GPUs.
#
#   bash benchmarks/gpu_distributed.sh [OUT]        (OUT defaults to /tmp/msif-gpu-distributed)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/msif-gpu-distributed}"
PY="${PYTHON:-python}"
if [ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
N=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$N" -lt 1 ]; then
    echo "gpu_distributed.sh: no CUDA device is visible; run it on a GPU machine" >&2
    exit 1
fi
echo "devices: $N"
"$PY" benchmarks/probe.py --shape 160m --out "$OUT/160m" --documents 2000 --sft 64
M="$OUT/160m/model"; C="$OUT/160m/corpus-2000.jsonl"
run() {  # ranks, then msif arguments; prints the wall time
    local n=$1; shift
    local t0=$(date +%s.%N)
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m msif "$@" --device cuda >/dev/null
    echo "$(date +%s.%N) - $t0" | bc
}
"$PY" -m msif fit "$M" "$OUT/160m/sft-64.jsonl" --out "$OUT/ft" --objective answer --device cuda --no-progress --restart
for n in 1 "$N"; do
    fit=$(run "$n" fit "$M" "$C" --out "$OUT/pt-$n" --max-examples 512 --batch-size 8 --no-progress --restart)
    att=$(run "$n" attribute --pretrained "$M" --finetuned "$M" --corpus "$C" --pretrained-factors "$OUT/pt-$n" \
          --finetuned-factors "$OUT/ft" --prompt "w10 w11 w12" --answer " w13" --retriever all --batch-size 16 --json --no-progress)
    echo "ranks $n: fit ${fit} s, attribute ${att} s"
done
"$PY" - "$OUT/pt-1" "$OUT/pt-$N" <<'PYEOF'
import sys
from msif.curvature.factors import FactorSet
a, b = FactorSet.load(sys.argv[1]), FactorSet.load(sys.argv[2])
worst = 0.0
for blk in a.blocks:
    x, y = a.lambdas(blk), b.lambdas(blk)
    worst = max(worst, float((x - y).abs().max() / y.abs().max()))
print(f"1 rank vs {b.meta.get('world_size', 1)} ranks: largest relative difference of the eigenvalue corrections {worst:.2e}")
PYEOF
