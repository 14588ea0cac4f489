#!/usr/bin/env bash
# Keep a Spot / preemptible run going: when the slice is preempted (or gone), delete it, create it
# again, set it up and relaunch. The trainer restores the latest checkpoint in the gs:// workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091  # common.sh is checked on its own (faster)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FLAGS="name zone project accelerator runtime-version spot preemptible queued poll wait-timeout
 repo rev dir venv python jax-version libtpu-url config workdir log loop interval"
USAGE="Usage: $CATJAX_PROG [--loop] --name NAME --zone ZONE --accelerator TYPE --repo URL --rev REV --config FILE --workdir gs://... [create flags]

Reads the state of the TPU VM (with --queued: of the queued resource) and
  READY / ACTIVE                    does nothing (the run is assumed to be going);
  PREEMPTED, TERMINATED, SUSPENDED,
  FAILED                            deletes it, then creates, sets up and launches as the other
                                    scripts do;
  absent                            creates, sets up and launches (so it also starts from zero);
  anything else (CREATING, ...)     does nothing this time.
Once, or with --loop every --interval seconds until Ctrl-C. A dry run takes the state to be
PREEMPTED (SUSPENDED with --queued) to show the whole recovery."

catjax_parse "$FLAGS" "$USAGE" "$@"
catjax_require name zone accelerator repo rev config workdir
catjax_resolve_tpu
catjax_check_launch

recover_once() {
  local assumed=PREEMPTED
  if ((P_QUEUED)); then assumed=SUSPENDED; fi
  catjax_state "$assumed"
  case $CATJAX_STATE in
    READY | ACTIVE)
      catjax_log "$P_NAME is $CATJAX_STATE: nothing to do"
      return 0
      ;;
    PREEMPTED | TERMINATED | SUSPENDED | FAILED)
      catjax_log "$P_NAME is $CATJAX_STATE: recreating it"
      catjax_delete
      ;;
    '') catjax_log "$P_NAME does not exist: creating it" ;;
    *)
      catjax_log "$P_NAME is $CATJAX_STATE: nothing to do until it settles"
      return 0
      ;;
  esac
  catjax_create
  catjax_setup
  catjax_launch
}

if ((P_LOOP && !P_DRY_RUN)); then
  while :; do
    # A subshell with its own set -e: one failed check (gcloud hiccup, stockout) must not end the loop,
    # and a failed step must not go on to the next one.
    set +e
    (
      set -e
      recover_once
    )
    rc=$?
    set -e
    if ((rc != 0)); then catjax_log "this check failed (exit $rc); next one in ${P_INTERVAL}s"; fi
    sleep "$P_INTERVAL"
  done
fi
recover_once
if ((P_LOOP)); then catjax_log "dry run: --loop would repeat this every ${P_INTERVAL}s"; fi
