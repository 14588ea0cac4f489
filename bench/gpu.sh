#!/usr/bin/env bash
# One prepared GPU check (NVIDIA machine, jax[cuda], torch and transformers preinstalled, no
# network): decode vs the bandwidth roofline, training-step MFU, catjax vs transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5  # leave room for torch in the same process
PYTHONUNBUFFERED=1 python3 bench/gpu.py 2>&1 | tee "${OUT:-/tmp}/gpu.log"
