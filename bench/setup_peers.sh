#!/usr/bin/env bash
# Builds the peers' environment for bench/run.py: a venv of its own (.venv-peers) with HF
# `transformers` + `torch==2.13.0` (generate), `trl` (GRPOTrainer) and `google-tunix` (sampler,
# GRPOLearner). Kept apart from .venv because Tunix pins safetensors<0.8, which downgrades
# transformers. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${PEERS_VENV:-.venv-peers}"
STAMP="$VENV/.installed"
[[ -f "$STAMP" ]] && { echo "peers venv ready: $VENV"; exit 0; }
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first, pinned, so nothing later pulls a CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q torch==2.13.0 trl==1.16.0 google-tunix==0.1.7 gguf==0.19.0 \
  accelerate==1.15.0 ml-collections==1.1.0
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("torch", "transformers", "trl", "google-tunix", "jax", "flax", "safetensors"):
    print(f"{p}=={md.version(p)}")
PY
touch "$STAMP"
