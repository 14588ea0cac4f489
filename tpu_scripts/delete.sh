#!/usr/bin/env bash
# Delete the slice (and its queued resource with --queued): billing stops, the gs:// workdir stays.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091  # common.sh is checked on its own (faster)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FLAGS="name zone project queued"
USAGE="Usage: $CATJAX_PROG --name NAME --zone ZONE [--queued]

Deletes the TPU VM NAME without asking; with --queued, the queued resource NAME and its TPU VM."
catjax_parse "$FLAGS" "$USAGE" "$@"
catjax_require name zone
catjax_delete
