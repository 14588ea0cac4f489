# shellcheck shell=bash
# Sourced by tpu_scripts/*.sh, never run: parameters (flags > env file > defaults), quoting, dry run,
# and every gcloud command line the scripts issue, so that the scripts themselves stay a few lines.
# Plain bash 3.2 (macOS's /bin/bash): no associative arrays, no ${x^^}, empty arrays guarded.

CATJAX_PROG=$(basename "$0")
CATJAX_LIBTPU_URL=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# Flag --foo-bar <-> env-file key FOO_BAR <-> shell variable P_FOO_BAR (prefixed so that keys such
# as NAME or LINES never clobber the caller's environment).
CATJAX_VALUE_KEYS="NAME ZONE PROJECT ACCELERATOR RUNTIME_VERSION REPO REV DIR VENV PYTHON JAX_VERSION
 LIBTPU_URL CONFIG WORKDIR LOG WORKER LINES GRACE POLL WAIT_TIMEOUT INTERVAL"
CATJAX_BOOL_KEYS="SPOT PREEMPTIBLE QUEUED DRY_RUN FOLLOW LOOP"
CATJAX_INT_KEYS="LINES GRACE POLL WAIT_TIMEOUT INTERVAL"

# shellcheck disable=SC2034  # some P_* are read only by the scripts that source this
catjax_defaults() {
  P_NAME='' P_ZONE='' P_PROJECT='' P_ACCELERATOR='' P_RUNTIME_VERSION=''
  P_REPO='' P_REV='' P_DIR=catjax P_VENV=catjax-venv P_PYTHON=python3.11
  P_JAX_VERSION=0.10.2 P_LIBTPU_URL=$CATJAX_LIBTPU_URL  # jax pinned as in setup.py
  P_CONFIG='' P_WORKDIR='' P_LOG=catjax-run.log
  P_WORKER=0 P_LINES=100 P_GRACE=120 P_POLL=30 P_WAIT_TIMEOUT=0 P_INTERVAL=300
  P_SPOT=0 P_PREEMPTIBLE=0 P_QUEUED=0 P_DRY_RUN=0 P_FOLLOW=1 P_LOOP=0
  P_OVERRIDES=()
}

catjax_die() {
  printf '%s: error: %s\n' "$CATJAX_PROG" "$*" >&2
  exit 2
}

catjax_log() {
  printf '%s: %s\n' "$CATJAX_PROG" "$*" >&2
}

catjax_has() {  # catjax_has "WORD LIST" WORD
  [[ " ${1//$'\n'/ } " == *" $2 "* ]]  # the key lists span lines
}

catjax_key() {  # runtime-version -> RUNTIME_VERSION
  printf '%s' "${1//-/_}" | tr '[:lower:]' '[:upper:]'
}

catjax_set() {  # catjax_set KEY VALUE WHERE: checks the value's type (WHERE names it in the error)
  local value=$2
  if catjax_has "$CATJAX_BOOL_KEYS" "$1"; then
    case $2 in
      1 | true | True | TRUE | yes | on) value=1 ;;
      0 | false | False | FALSE | no | off | '') value=0 ;;
      *) catjax_die "$3: expected true or false, got '$2'" ;;
    esac
  elif catjax_has "$CATJAX_INT_KEYS" "$1" && [[ ! $2 =~ ^[0-9]+$ ]]; then
    catjax_die "$3: expected a whole number, got '$2'"
  fi
  printf -v "P_$1" '%s' "$value"
}

# KEY=VALUE lines, '#' comments; read as data, never sourced, so a stray $() runs nothing. A value
# may be wrapped in matching quotes; OVERRIDES is split on whitespace.
catjax_load_env() {
  local file=$1 line key value n=0
  [[ -f $file ]] || catjax_die "env file '$file' not found"
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line#"${line%%[![:space:]]*}"}
    line=${line%"${line##*[![:space:]]}"}
    if [[ -z $line || $line == \#* ]]; then continue; fi
    line=${line#export }
    [[ $line == *=* ]] || catjax_die "$file:$n: expected KEY=VALUE, got '$line'"
    key=${line%%=*} value=${line#*=}
    if [[ ${#value} -ge 2 && ( ($value == \"*\" && $value == *\") || ($value == \'*\' && $value == *\') ) ]]
    then
      value=${value:1:${#value}-2}
    fi
    if [[ $key == OVERRIDES ]]; then
      read -r -a P_OVERRIDES <<<"$value"
    elif catjax_has "$CATJAX_VALUE_KEYS $CATJAX_BOOL_KEYS" "$key"; then
      catjax_set "$key" "$value" "$file:$n: $key"
    else
      catjax_die "$file:$n: unknown key '$key'"
    fi
  done <"$file"
}

# catjax_parse FLAGS USAGE "$@": FLAGS are the flags this script takes (without --), USAGE the head of
# its --help. --env/--dry-run/--help are always accepted; --config.* and whatever follows `--` are
# catjax overrides, for the scripts that launch.
catjax_parse() {
  CATJAX_FLAGS=$1 CATJAX_USAGE=$2
  shift 2
  local allowed="$CATJAX_FLAGS dry-run" arg flag key value has_value env_file=${CATJAX_TPU_ENV:-}
  local want_env=0
  catjax_defaults
  for arg in "$@"; do  # the env file first, so that flags override it
    if ((want_env)); then
      env_file=$arg want_env=0
      continue
    fi
    case $arg in
      --) break ;;
      --env) want_env=1 ;;
      --env=*) env_file=${arg#--env=} ;;
    esac
  done
  ((want_env == 0)) || catjax_die "--env needs a file"
  if [[ -n $env_file ]]; then catjax_load_env "$env_file"; fi
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help)
        catjax_usage
        exit 0
        ;;
      --env) shift ;;
      --env=*) ;;
      --)
        catjax_has "$allowed" config || catjax_die "unexpected arguments after --: $*"
        if (($#)); then P_OVERRIDES+=("$@"); fi
        break
        ;;
      --config.*)
        catjax_has "$allowed" config || catjax_die "unknown flag ${arg%%=*} (see --help)"
        [[ $arg == *=* ]] || catjax_die "write catjax overrides as $arg=VALUE"
        P_OVERRIDES+=("$arg")
        ;;
      --no-*)
        flag=${arg#--no-}
        key=$(catjax_key "$flag")
        if ! catjax_has "$allowed" "$flag" || ! catjax_has "$CATJAX_BOOL_KEYS" "$key"; then
          catjax_die "unknown flag $arg (see --help)"
        fi
        printf -v "P_$key" 0
        ;;
      --*)
        flag=${arg#--} value='' has_value=0
        if [[ $flag == *=* ]]; then
          value=${flag#*=} flag=${flag%%=*} has_value=1
        fi
        catjax_has "$allowed" "$flag" || catjax_die "unknown flag --$flag (see --help)"
        key=$(catjax_key "$flag")
        if catjax_has "$CATJAX_BOOL_KEYS" "$key"; then
          ((has_value)) || value=1
        elif ((!has_value)); then
          (($#)) || catjax_die "--$flag needs a value"
          value=$1
          shift
        fi
        catjax_set "$key" "$value" "--$flag"
        ;;
      *) catjax_die "unexpected argument '$arg' (see --help)" ;;
    esac
  done
}

catjax_usage() {
  local flag
  printf '%s\n\nOptions (flags override the env file, whose keys are the flag names in\nUPPER_CASE with _ for -, e.g. RUNTIME_VERSION=...):\n' "$CATJAX_USAGE"
  for flag in $CATJAX_FLAGS env dry-run help; do
    case $flag in
      name) set -- "--name NAME" "TPU VM name (also the queued resource's name) [required]" ;;
      zone) set -- "--zone ZONE" "e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p) [required]" ;;
      project) set -- "--project PROJECT" "GCP project (default: gcloud's configured project)" ;;
      accelerator) set -- "--accelerator TYPE" "v5litepod-8 (v5e-8 is accepted), v5p-8, v4-32, ... [required]" ;;
      runtime-version) set -- "--runtime-version V" "TPU software version (default from the accelerator:" \
        "v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)" ;;
      spot) set -- "--spot" "Spot capacity: cheap, preemptible at any time, no time limit" ;;
      preemptible) set -- "--preemptible" "preemptible TPU VM (24 h limit; not for --queued)" ;;
      queued) set -- "--queued" "go through a queued resource (waits for capacity; then ACTIVE)" ;;
      poll) set -- "--poll SECONDS" "queued resource state poll interval (default 30)" ;;
      wait-timeout) set -- "--wait-timeout SECONDS" "give up waiting for ACTIVE after this (default 0: never)" ;;
      repo) set -- "--repo URL" "catjax git repository the workers clone [required]" ;;
      rev) set -- "--rev REV" "branch, tag or full commit SHA checked out on every worker [required]" ;;
      dir) set -- "--dir DIR" "checkout on each worker, relative to its home (default catjax)" ;;
      venv) set -- "--venv DIR" "virtual environment on each worker (default catjax-venv)" ;;
      python) set -- "--python PY" "Python >= 3.11 that makes the venv; python3.X is apt-installed" \
        "when missing (default python3.11)" ;;
      jax-version) set -- "--jax-version V" "jax[tpu] version, as pinned in setup.py (default $P_JAX_VERSION)" ;;
      libtpu-url) set -- "--libtpu-url URL" "pip --find-links for libtpu (default $CATJAX_LIBTPU_URL)" ;;
      config) set -- "--config FILE[:ARG]" "catjax config, relative to the checkout [required];" \
        "--config.FIELD=VALUE flags and anything after -- are passed to catjax.main" ;;
      workdir) set -- "--workdir gs://..." "shared run directory; checkpoints there make a relaunch resume [required]" ;;
      log) set -- "--log FILE" "run log on each worker, relative to its home (default catjax-run.log)" ;;
      worker) set -- "--worker N|all" "which worker's log (default 0)" ;;
      lines) set -- "--lines N" "lines of log shown first (default 100)" ;;
      follow) set -- "--no-follow" "print the log's tail and return instead of following it" ;;
      grace) set -- "--grace SECONDS" "wait after SIGTERM (the trainer checkpoints) before SIGKILL (default 120)" ;;
      loop) set -- "--loop" "check every --interval seconds, forever, instead of once" ;;
      interval) set -- "--interval SECONDS" "seconds between checks with --loop (default 300)" ;;
      env) set -- "--env FILE" "KEY=VALUE parameter file (default \$CATJAX_TPU_ENV; see tpu.env.example)" ;;
      dry-run) set -- "--dry-run" "print the gcloud commands instead of running them" ;;
      help) set -- "-h, --help" "this help" ;;
    esac
    printf '  %-22s %s\n' "$1" "$2"
    if (($# > 2)); then printf '  %-22s %s\n' "" "$3"; fi
  done
}

catjax_require() {  # catjax_require flag...: a one-line error naming the first missing one
  local flag key value
  for flag in "$@"; do
    key=$(catjax_key "$flag")
    value=P_$key
    [[ -n ${!value} ]] || catjax_die "missing --$flag (or $key in the env file)"
  done
}

# Accelerator alias, default runtime version, and the capacity flags that exclude each other.
catjax_resolve_tpu() {
  case $P_ACCELERATOR in
    v5e-*) P_ACCELERATOR=v5litepod-${P_ACCELERATOR#v5e-} ;;
  esac
  if [[ -z $P_RUNTIME_VERSION ]]; then
    case $P_ACCELERATOR in
      v4-*) P_RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5litepod-*) P_RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) P_RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e-*) P_RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) catjax_die "missing --runtime-version (no default for --accelerator=$P_ACCELERATOR)" ;;
    esac
  fi
  if ((P_SPOT && P_PREEMPTIBLE)); then catjax_die "--spot and --preemptible exclude each other"; fi
  if ((P_QUEUED && P_PREEMPTIBLE)); then
    catjax_die "--preemptible is for plain TPU VMs; a queued resource takes --spot"
  fi
}

catjax_check_launch() {
  [[ $P_WORKDIR == gs://?* ]] ||
    catjax_die "--workdir must be gs://...: every worker writes the same checkpoints, and they must outlive the VM"
}

# Quoting exactly like Python's shlex.quote, so that a dry run's lines can be pasted into a shell and
# compared with shlex.join in the tests.
CATJAX_SAFE='abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-'

catjax_quote() {
  if [[ -n $1 && $1 != *[!"$CATJAX_SAFE"]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

catjax_join() {
  local word sep=''
  for word in "$@"; do
    printf '%s%s' "$sep" "$(catjax_quote "$word")"
    sep=' '
  done
}

# A word for the worker's shell: double quotes where they suffice, so that the remote command needs no
# '"'"' escapes once the whole of it is quoted for gcloud.
catjax_rquote() {
  case $1 in
    *[\"\$\`\\!]*) catjax_quote "$1" ;;
    *) if [[ -n $1 && $1 != *[!"$CATJAX_SAFE"]* ]]; then printf '%s' "$1"; else printf '"%s"' "$1"; fi ;;
  esac
}

catjax_rpath() {  # a path on the worker; relative ones are under its home directory
  if [[ $1 == /* ]]; then
    catjax_rquote "$1"
  else
    # shellcheck disable=SC2016  # $HOME expands on the worker
    printf '"$HOME"/%s' "$(catjax_rquote "$1")"
  fi
}

# The one place that runs gcloud: a dry run prints the command line on stdout and runs nothing; a real
# run echoes it on stderr first.
catjax_run() {
  if ((P_DRY_RUN)); then
    printf '%s\n' "$(catjax_join "$@")"
    return 0
  fi
  printf '+ %s\n' "$(catjax_join "$@")" >&2
  "$@"
}

catjax_where() {  # where the resource lives: zone (required) and project (optional)
  CATJAX_WHERE=("--zone=$P_ZONE")
  if [[ -n $P_PROJECT ]]; then CATJAX_WHERE+=("--project=$P_PROJECT"); fi
}

catjax_create() {
  local cmd
  catjax_where
  if ((P_QUEUED)); then
    cmd=(gcloud compute tpus queued-resources create "$P_NAME" "--node-id=$P_NAME" "${CATJAX_WHERE[@]}"
      "--accelerator-type=$P_ACCELERATOR" "--runtime-version=$P_RUNTIME_VERSION")
  else
    cmd=(gcloud compute tpus tpu-vm create "$P_NAME" "${CATJAX_WHERE[@]}"
      "--accelerator-type=$P_ACCELERATOR" "--version=$P_RUNTIME_VERSION")
  fi
  if ((P_SPOT)); then cmd+=(--spot); fi
  if ((P_PREEMPTIBLE)); then cmd+=(--preemptible); fi
  catjax_run "${cmd[@]}" --quiet
  # tpu-vm create returns once the VM is READY; a queued resource only once it is accepted.
  if ((P_QUEUED)); then catjax_wait_active; fi
}

catjax_delete() {
  catjax_where
  if ((P_QUEUED)); then  # --force takes the TPU VM with it
    catjax_run gcloud compute tpus queued-resources delete "$P_NAME" "${CATJAX_WHERE[@]}" --force --quiet
  else
    catjax_run gcloud compute tpus tpu-vm delete "$P_NAME" "${CATJAX_WHERE[@]}" --quiet
  fi
}

# Sets CATJAX_STATE to the TPU VM's state (READY, PREEMPTED, ...) or, with --queued, the queued
# resource's (ACTIVE, SUSPENDED, ...); "" when it does not exist. Any other gcloud failure (auth,
# network) stops the script: recreating a healthy slice on a transient error would kill the run.
# A dry run prints the command and takes the state to be $1.
catjax_state() {
  local cmd err
  catjax_where
  if ((P_QUEUED)); then
    cmd=(gcloud compute tpus queued-resources describe "$P_NAME" "${CATJAX_WHERE[@]}" "--format=value(state.state)")
  else
    cmd=(gcloud compute tpus tpu-vm describe "$P_NAME" "${CATJAX_WHERE[@]}" "--format=value(state)")
  fi
  if ((P_DRY_RUN)); then
    catjax_run "${cmd[@]}"
    CATJAX_STATE=$1
    catjax_log "dry run: taking the state to be ${1:-absent}"
    return 0
  fi
  printf '+ %s\n' "$(catjax_join "${cmd[@]}")" >&2
  err=$(mktemp)
  if CATJAX_STATE=$("${cmd[@]}" 2>"$err"); then
    CATJAX_STATE=${CATJAX_STATE//[[:space:]]/}
  elif grep -Eq 'NOT_FOUND|HTTPError 404' "$err"; then
    CATJAX_STATE=''
  else
    cat "$err" >&2
    rm -f "$err"
    catjax_die "could not read the state of $P_NAME (gcloud failed, see above)"
  fi
  rm -f "$err"
}

catjax_wait_active() {
  local start=$SECONDS
  while :; do
    catjax_state ACTIVE
    case $CATJAX_STATE in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | '')
        catjax_die "queued resource $P_NAME is ${CATJAX_STATE:-gone} (gcloud compute tpus queued-resources describe $P_NAME)" ;;
    esac
    if ((P_WAIT_TIMEOUT && SECONDS - start >= P_WAIT_TIMEOUT)); then
      catjax_die "queued resource $P_NAME still $CATJAX_STATE after --wait-timeout=$P_WAIT_TIMEOUT s"
    fi
    catjax_log "queued resource $P_NAME is $CATJAX_STATE; checking again in ${P_POLL}s"
    sleep "$P_POLL"
  done
}

catjax_ssh() {  # catjax_ssh WORKER COMMAND: COMMAND runs under the worker's login shell
  catjax_where
  catjax_run gcloud compute tpus tpu-vm ssh "$P_NAME" "${CATJAX_WHERE[@]}" "--worker=$1" "--command=$2" --quiet
}

# The commands the workers run, each one line of POSIX sh (bash or dash; one line per command in a
# dry run). Setup stops at its first failed step (set -e); launch and stop check theirs.
catjax_setup() {
  local py dir venv pip install_py=''
  py=$(catjax_rquote "$P_PYTHON") dir=$(catjax_rpath "$P_DIR") venv=$(catjax_rpath "$P_VENV")
  pip="$venv/bin/pip install -q"
  if [[ $P_PYTHON =~ ^python3\.[0-9]+$ ]]; then  # TPU images are Ubuntu 22.04 with Python 3.10
    # A fresh VM's unattended-upgrades may hold the dpkg lock for a while: wait for it.
    local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq"
    install_py="if ! command -v $py >/dev/null 2>&1; then $apt update && $apt install -y $py $py-venv; fi; "
  fi
  catjax_ssh all "set -e; ${install_py}if [ ! -d $dir/.git ]; then git clone -q $(catjax_rquote "$P_REPO") $dir; fi; \
git -C $dir fetch -q origin $(catjax_rquote "$P_REV"); git -C $dir checkout -q --detach FETCH_HEAD; \
$py -m venv $venv; $pip -U pip; \
$pip $(catjax_rquote "jax[tpu]==$P_JAX_VERSION") -f $(catjax_rquote "$P_LIBTPU_URL"); $pip -e $dir; \
echo \"\$(hostname): catjax at \$(git -C $dir rev-parse HEAD)\""
}

# The pid file lets stop.sh and a second launch find the run; /proc/PID/cmdline guards against a pid
# reused since. setsid: the run leads its own process group, so that stop can kill its helpers too
# (`kill -9 -PID`: dash's kill takes no --). Unbuffered, so that the log keeps up with print().
# shellcheck disable=SC2016  # $1 expands on the worker
CATJAX_ALIVE='alive() { kill -0 "$1" 2>/dev/null && tr "\0" " " </proc/"$1"/cmdline | grep -q catjax.main; }; '

catjax_launch() {
  local dir venv log pid args word
  dir=$(catjax_rpath "$P_DIR") venv=$(catjax_rpath "$P_VENV") log=$(catjax_rpath "$P_LOG")
  pid=$(catjax_rpath "${P_LOG%.log}.pid")
  args="-m catjax.main --config=$(catjax_rquote "$P_CONFIG") --workdir=$(catjax_rquote "$P_WORKDIR")"
  for word in ${P_OVERRIDES[@]+"${P_OVERRIDES[@]}"}; do args+=" $(catjax_rquote "$word")"; done
  catjax_ssh all "${CATJAX_ALIVE}cd $dir || exit 1; \
if [ -f $pid ] && alive \"\$(cat $pid)\"; then echo \"\$(hostname): catjax is already running (stop.sh first)\" >&2; exit 1; fi; \
PYTHONUNBUFFERED=1 setsid nohup $venv/bin/python $args >>$log 2>&1 </dev/null & echo \$! >$pid; \
echo \"\$(hostname): catjax started, pid \$!\""
}

catjax_logs() {
  local follow=''
  if ((P_FOLLOW)); then follow=' -F'; fi
  catjax_ssh "$P_WORKER" "tail -n $P_LINES$follow $(catjax_rpath "$P_LOG")"
}

catjax_stop() {
  local pid
  pid=$(catjax_rpath "${P_LOG%.log}.pid")
  catjax_ssh all "${CATJAX_ALIVE}if [ ! -f $pid ]; then echo \"\$(hostname): no catjax run\"; exit 0; fi; \
p=\$(cat $pid); if alive \"\$p\"; then kill -TERM \"\$p\"; i=0; \
while alive \"\$p\" && [ \"\$i\" -lt $P_GRACE ]; do sleep 1; i=\$((i + 1)); done; kill -9 \"-\$p\" 2>/dev/null; fi; \
rm -f $pid; echo \"\$(hostname): catjax stopped\""
}
