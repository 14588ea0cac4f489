#!/usr/bin/env bash
# Follow a worker's run log (worker 0 logs the metrics; the others mostly matter when one fails).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091  # common.sh is checked on its own (faster)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FLAGS="name zone project worker log lines follow"
USAGE="Usage: $CATJAX_PROG --name NAME --zone ZONE [--worker N|all] [--lines N] [--no-follow]

Shows the last lines of the run log on one worker (or all) and follows it until Ctrl-C, which leaves
the run alone."
catjax_parse "$FLAGS" "$USAGE" "$@"
catjax_require name zone
[[ $P_WORKER == all || $P_WORKER =~ ^[0-9]+$ ]] || catjax_die "--worker: expected a number or all, got '$P_WORKER'"
catjax_logs
