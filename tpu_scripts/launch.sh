#!/usr/bin/env bash
# Step 3 of 3: start the run on every worker at once. Multi-controller JAX: each worker runs the same
# command and Cloud TPU tells JAX who its peers are, so nothing here is per-host.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091  # common.sh is checked on its own (faster)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FLAGS="name zone project config workdir dir venv log"
USAGE="Usage: $CATJAX_PROG --name NAME --zone ZONE --config FILE[:ARG] --workdir gs://... [--config.FIELD=VALUE ...] [-- catjax flags]

Runs 'python -m catjax.main --config=... --workdir=...' under nohup on every worker, detached from
the ssh session, with the output in a log file on each worker (see logs.sh). A run whose workdir holds
checkpoints resumes from the latest one."
catjax_parse "$FLAGS" "$USAGE" "$@"
catjax_require name zone config workdir
catjax_check_launch
catjax_launch
