#!/usr/bin/env bash
# Create .venv (if missing) and install msif with pinned dependencies. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.msif-installed ] || [ pyproject.toml -nt .venv/.msif-installed ] || [ constraints.txt -nt .venv/.msif-installed ]; then
  python -m pip install -q --upgrade pip
  # the CPU build of torch 2.13.0 lies on this machine's disk; installing it first keeps pip from
  # fetching a multi-GB CUDA build for the torch requirement of msif and sentence-transformers
  python -m pip install -q torch==2.13.0
  python -m pip install -q -c constraints.txt -e ".[dev]"
  touch .venv/.msif-installed
fi
