#!/usr/bin/env bash
# One prepared GPU check (NVIDIA machine, jax[cuda], torch and transformers preinstalled, no
# network): ceilings, decode vs the bandwidth roofline (the three decode layouts, one call
# profiled), draw costs, synthesis vs one more rollout, training-step MFU, catjax vs
# transformers. Under 8 minutes; the sampler's optimised HLO lands in $OUT/hlo.tar.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/catjax-gpu}"
mkdir -p "$OUT"
export OUT
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5  # leave room for torch in the same process
export XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$OUT/hlo --xla_dump_hlo_module_re=.*_sample.*"
PYTHONUNBUFFERED=1 python3 bench/gpu.py "$@" 2>&1 | tee "$OUT/gpu.log"
if [ -d "$OUT/hlo" ]; then  # keep the HLO text before and after optimisation only
  find "$OUT/hlo" -type f ! -name '*before_optimizations.txt' ! -name '*after_optimizations.txt' -delete
  tar -C "$OUT" -czf "$OUT/hlo.tar.gz" hlo && rm -rf "$OUT/hlo"
fi
