#!/usr/bin/env bash
# Step 2 of 3: the same environment on every worker of the slice (rerun it to move to another --rev).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091  # common.sh is checked on its own (faster)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FLAGS="name zone project repo rev dir venv python jax-version libtpu-url"
USAGE="Usage: $CATJAX_PROG --name NAME --zone ZONE --repo URL --rev REV

On every worker (--worker=all): clones --repo (once) and checks out --rev, makes a Python venv, and
pip-installs jax[tpu] (libtpu from --libtpu-url) and catjax itself (pip install -e)."
catjax_parse "$FLAGS" "$USAGE" "$@"
catjax_require name zone repo rev
catjax_setup
