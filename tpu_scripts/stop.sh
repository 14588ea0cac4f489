#!/usr/bin/env bash
# Stop the run on every worker; the TPU VM stays (delete.sh removes it).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091  # common.sh is checked on its own (faster)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FLAGS="name zone project log grace"
USAGE="Usage: $CATJAX_PROG --name NAME --zone ZONE [--grace SECONDS]

Sends SIGTERM to the run on every worker (the trainer writes a checkpoint first), waits up to --grace
seconds, then SIGKILLs what is left of it. launch.sh resumes from that checkpoint."
catjax_parse "$FLAGS" "$USAGE" "$@"
catjax_require name zone
catjax_stop
