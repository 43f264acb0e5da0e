#!/usr/bin/env bash
# Set up the environment and run the demo on the bundled world (builds and caches it on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec msif demo "$@"
