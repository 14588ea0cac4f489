#!/usr/bin/env bash
# Step 1 of 3 (create, setup, launch): a TPU VM slice, or a queued resource that waits for capacity.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091  # common.sh is checked on its own (faster)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FLAGS="name zone project accelerator runtime-version spot preemptible queued poll wait-timeout"
USAGE="Usage: $CATJAX_PROG --name NAME --zone ZONE --accelerator TYPE [--spot|--preemptible] [--queued]

Creates the Cloud TPU VM slice NAME (every host of it). With --queued the request goes through a
queued resource of the same name and this waits until it is ACTIVE."
catjax_parse "$FLAGS" "$USAGE" "$@"
catjax_require name zone accelerator
catjax_resolve_tpu
catjax_create
