#!/usr/bin/env bash
# msif beside Kronfluence 1.0.1 in one process: builds its own venv (benchmarks/.venv-kronfluence) on
# first use, then runs benchmarks/vs_kronfluence.py with the arguments given here.
#
#     bash benchmarks/vs_kronfluence.sh [--quick] [--repeats 2] [--damping 1e-3] [model options]
#
# Kronfluence is never a dependency of msif: it lives in this venv only. Its wheel declares torchvision
# and einconv (for Conv2d modules), which would replace the local CPU torch: it is installed with
# --no-deps, and its imports (accelerate, einops, einconv, opt_einsum; safetensors and tqdm come with
# msif) are installed under a constraint pinning torch to 2.13.0. torchvision is never installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=benchmarks/.venv-kronfluence
TORCH=2.13.0
if [ ! -f "$VENV/.installed" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  . "$VENV/bin/activate"
  pin="$(mktemp)"
  trap 'rm -f "$pin"' EXIT
  echo "torch==$TORCH" >"$pin"
  pip_q() { python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  pip_q torch==$TORCH      # the CPU build on this machine's disk, before anything needs torch
  pip_q -c "$pin" -c constraints.txt -e .
  pip_q -c "$pin" "accelerate>=0.31" "einops>=0.8" "opt-einsum>=3.3"
  pip_q --no-deps "einconv>=0.1"   # imported by kronfluence's Conv2d wrapper; needs only einops
  # pip then says that kronfluence "requires torchvision, which is not installed": expected, it is never imported
  pip_q --no-deps kronfluence==1.0.1
  got="$(python -c 'import torch; print(torch.__version__)')"
  case "$got" in
    "$TORCH"*) ;;
    *) echo "torch is $got in $VENV, not $TORCH: remove $VENV and rerun" >&2; exit 1 ;;
  esac
  python -c "import kronfluence, msif" || { echo "kronfluence or msif does not import in $VENV" >&2; exit 1; }
  touch "$VENV/.installed"
else
  . "$VENV/bin/activate"
fi
exec python benchmarks/vs_kronfluence.py "$@"
