# shellcheck shell=bash
# Shared by launch/tpu_vm.sh, tpu_pod.sh and tpu_queued.sh (sourced, not run): option parsing,
# quoting, dry-run, and the subcommands that talk to TPU VMs through `gcloud compute tpus`.
#
# Quoting: a remote command is one string that the VM's shell parses once more, so every word
# that comes from the user (paths, the config, each flag after `--`) is quoted with
# `printf '%q'`; a flag like --config.data.text_buckets='(256,512,1024)' or --config.note='a b'
# reaches the remote python as the one argument it was here. The whole script is then wrapped
# in `bash -c '...'` (POSIX single quotes) so it does not depend on the login shell.

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  # empty arrays under `set -u` need bash 4.4 (macOS ships 3.2: brew install bash)
  echo "${0##*/}: needs bash >= 4.4, this is $BASH_VERSION" >&2
  exit 1
fi

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
UV_VERSION=0.13.8  # the installer of the pinned Python and the requirements on the VM

die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# quote WORDS...: the words as one shell-safe string (bash syntax; `printf '%q'`).
quote() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

# squote STRING: STRING in POSIX single quotes (any shell reads it back verbatim).
squote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# run CMD...: runs CMD, or with --dry-run prints it (quoted, runnable) instead.
run() {
  if ((DRY_RUN)); then printf '+ %s\n' "$(quote "$@")"; else "$@"; fi
}

# --------------------------------------------------------------------------- options
# Every option has an environment default; flags after `--` go to visor_jax.main unchanged.
init_tpu_options() {
  NAME=${VISOR_TPU_NAME:-}
  ZONE=${VISOR_TPU_ZONE:-}
  PROJECT=${VISOR_PROJECT:-}
  TYPE=${VISOR_TPU_TYPE:-$DEFAULT_TYPE}
  VERSION=${VISOR_TPU_VERSION:-$DEFAULT_VERSION}
  WORKDIR=${VISOR_WORKDIR:-}
  CONFIG=${VISOR_CONFIG:-configs/universal.py}
  RUN_NAME=${VISOR_RUN:-train}
  REMOTE_DIR=${VISOR_REMOTE_DIR:-visor_jax}  # relative to the remote home
  PYTHON_VERSION=${VISOR_PYTHON:-3.11.7}     # the Python this repo is verified on
  WORKER=$DEFAULT_WORKER
  WORKER_SET=0
  SPOT=${DEFAULT_SPOT:-0}
  LINES=100
  FOLLOW=1
  GRACE=600
  DRY_RUN=0
  EXTRA=()
}

# parse_tpu_options ARGS...: sets the globals above. A script's own options go to its functions
# `script_flag OPTION` (flags) and `script_option OPTION VALUE` (valued), both optional and
# returning 1 for an option they do not know.
parse_tpu_options() {
  local opt val
  while (($#)); do
    opt=$1
    case $opt in
      --) shift; EXTRA=("$@"); return 0 ;;
      -h|--help) usage; exit 0 ;;
      -n|--dry-run) DRY_RUN=1; shift; continue ;;
      --spot) SPOT=1; shift; continue ;;
      --no-follow) FOLLOW=0; shift; continue ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*)
        if declare -F script_flag >/dev/null && script_flag "$opt"; then shift; continue; fi
        (($# >= 2)) || die "$opt needs a value"; val=$2; shift 2 ;;
      *) die "unexpected argument '$opt' (flags for visor_jax.main go after --; see --help)" ;;
    esac
    case $opt in
      --name) NAME=$val ;;
      --zone) ZONE=$val ;;
      --project) PROJECT=$val ;;
      --type) TYPE=$val ;;
      --version) VERSION=$val ;;
      --workdir) WORKDIR=$val ;;
      --config) CONFIG=$val ;;
      --run) RUN_NAME=$val ;;
      --remote-dir) REMOTE_DIR=$val ;;
      --python) PYTHON_VERSION=$val ;;
      --worker) WORKER=$val; WORKER_SET=1 ;;
      --lines) LINES=$val ;;
      --grace) GRACE=$val ;;
      *) if ! declare -F script_option >/dev/null || ! script_option "$opt" "$val"; then
           die "unknown option $opt (see --help)"
         fi ;;
    esac
  done
}

# need OPTION VAR ENV_VAR: dies unless the global VAR is set.
need() { [[ -n ${!2} ]] || die "$1 is required (or set $3)"; }

# validate_tpu_options: checks the options; a script may redefine it (calling this one).
validate_tpu_options() { validate_common_options; }

validate_common_options() {
  need --name NAME VISOR_TPU_NAME
  need --zone ZONE VISOR_TPU_ZONE
  [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--run must be a plain name, got '$RUN_NAME'"
  [[ $LINES =~ ^[0-9]+$ && $GRACE =~ ^[0-9]+$ ]] || die "--lines and --grace take integers"
  [[ $WORKER =~ ^(all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$ ]] ||
    die "--worker takes all, a worker number, a list (0,3) or a range (1-3)"
  # sync replaces the remote directory's contents: never let that be the home or the root.
  case ${REMOTE_DIR%/} in
    ''|.|/|'~'|"\$HOME"|..*) die "--remote-dir '$REMOTE_DIR' is not a directory sync may own" ;;
  esac
}

# ------------------------------------------------------------------ gcloud wrappers
gcloud_tpus() {
  run gcloud compute tpus "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

# on_workers WORKER SCRIPT: runs the bash SCRIPT on the TPU VM worker(s), in the remote home.
on_workers() {
  gcloud_tpus tpu-vm ssh "$NAME" --worker="$1" --command="bash -c $(squote "$2")"
}

# ---------------------------------------------------------------------- subcommands
do_create() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  gcloud_tpus tpu-vm create "$NAME" --accelerator-type="$TYPE" --version="$VERSION" "${spot[@]}"
}

do_delete() { gcloud_tpus tpu-vm delete "$NAME" --quiet; }

# existing: the NUL-separated paths on stdin that exist (a tracked file deleted in the working
# tree is not shipped).
existing() {
  local path
  while IFS= read -r -d '' path; do
    [[ -e $path ]] && printf '%s\0' "$path"
  done
  return 0
}

# sync: this checkout's files (tracked and untracked-but-not-ignored, uncommitted edits
# included; no .venv, no .git) as one tarball, copied to every worker and unpacked into
# REMOTE_DIR, whose other contents it replaces (its .venv and logs/ stay).
do_sync() {
  local tarball remote_tar=visor_jax_code.tar.gz
  tarball=$(mktemp "${TMPDIR:-/tmp}/visor_jax_code.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the path is local to this function
  trap "rm -f $(quote "$tarball")" EXIT  # on failure; removed below on success
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "sync ships a git checkout's files; $REPO_ROOT is not one"
  local pack=(tar --null -czf "$tarball" -T -)
  if ((DRY_RUN)); then
    printf '+ git -C %s ls-files -z -co --exclude-standard | %s\n' "$(quote "$REPO_ROOT")" \
      "$(quote "${pack[@]}")"
  else
    (cd "$REPO_ROOT" && git ls-files -z -co --exclude-standard | existing | "${pack[@]}")
  fi
  gcloud_tpus tpu-vm scp "$tarball" "$NAME:$remote_tar" --worker="$WORKER"
  rm -f "$tarball"
  local dir
  dir=$(quote "$REMOTE_DIR")
  on_workers "$WORKER" "set -euo pipefail
mkdir -p $dir
cd $dir
if [ -n \"\$(ls -A | grep -vx -e .venv -e logs)\" ] && [ ! -e .visor_jax_sync ]; then
  echo \"\$(hostname): $dir is not empty and was not made by sync: refusing to replace it\" >&2
  exit 1
fi
for pid_file in logs/*/*.pid; do  # never change the code under a running trainer
  if [ -s \"\$pid_file\" ] && kill -0 \"\$(cat \"\$pid_file\")\" 2>/dev/null; then
    echo \"\$(hostname): a run is going (\$pid_file): stop it before syncing\" >&2
    exit 1
  fi
done
find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +
tar -xzf \"\$HOME\"/$remote_tar
rm -f \"\$HOME\"/$remote_tar
touch .visor_jax_sync
files=\$(find . -path ./.venv -prune -o -type f -print | wc -l)
echo \"\$(hostname): synced \$files files into \$PWD\""
}

# install: a venv with the pinned Python (uv fetches that exact build), the requirements, then
# jax's TPU extra at the version of the pinned jaxlib (it adds libtpu).
do_install() {
  local jax_version
  jax_version=$(sed -n 's/^jaxlib==\([^ #]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ -n $jax_version ]] || die "requirements.txt pins no jaxlib==VERSION"
  on_workers "$WORKER" "set -euo pipefail
cd $(quote "$REMOTE_DIR")
export PATH=\"\$HOME/.local/bin:\$PATH\"
python3 -m pip install -q --user uv==$UV_VERSION ||
  python3 -m pip install -q --user --break-system-packages uv==$UV_VERSION
want=$(quote "$PYTHON_VERSION")
have=\$(.venv/bin/python -c 'import platform; print(platform.python_version())' 2>/dev/null || true)
if [ \"\$have\" != \"\$want\" ]; then
  rm -rf .venv
  uv venv --seed --python \"\$want\" .venv
fi
uv pip install -q --python .venv/bin/python -r requirements.txt
uv pip install -q --python .venv/bin/python $(quote "jax[tpu]==$jax_version")
.venv/bin/python -c 'import jax, socket
print(socket.gethostname(), \"jax\", jax.__version__, jax.device_count(), \"devices\")'"
}

# main_command: the trainer's argv (remote paths: the venv's python, the config relative to
# the synced repo); DISTRIBUTED=1 adds --config.distributed=True (multi-host).
main_command() {
  MAIN_ARGV=(.venv/bin/python -m visor_jax.main --config="$CONFIG" --workdir="$WORKDIR")
  ((DISTRIBUTED)) && MAIN_ARGV+=(--config.distributed=True)
  MAIN_ARGV+=("${EXTRA[@]}")
}

do_run() {
  need --workdir WORKDIR VISOR_WORKDIR
  if ((DISTRIBUTED)) && [[ $WORKDIR != gs://* ]]; then
    note "warning: --workdir $WORKDIR is not gs://: every worker must see the same checkpoints"
  fi
  main_command
  on_workers "$WORKER" "set -euo pipefail
cd $(quote "$REMOTE_DIR")
bash launch/on_host.sh start $(quote "$RUN_NAME") -- $(quote "${MAIN_ARGV[@]}")"
}

# status: "HOST: STATUS" per worker; "none" also on a worker that has no synced code yet.
do_status() {
  local dir
  dir=$(quote "$REMOTE_DIR")
  on_workers "$WORKER" "if [ -f $dir/launch/on_host.sh ]; then
  echo \"\$(hostname): \$(cd $dir && bash launch/on_host.sh status $(quote "$RUN_NAME"))\"
else
  echo \"\$(hostname): none\"
fi"
}

# logs: one worker's log (worker 0 unless --worker says otherwise).
do_logs() {
  local follow=once worker=$WORKER
  ((FOLLOW)) && follow=follow
  ((WORKER_SET)) || worker=0
  on_workers "$worker" "cd $(quote "$REMOTE_DIR") &&
exec bash launch/on_host.sh logs $(quote "$RUN_NAME") $LINES $follow"
}

do_stop() {
  on_workers "$WORKER" "cd $(quote "$REMOTE_DIR") &&
bash launch/on_host.sh stop $(quote "$RUN_NAME") $GRACE"
}

do_up() { do_sync; do_install; do_run; }

# tpu_main SUBCOMMAND [options] [-- flags]: the dispatcher; SUBCOMMAND runs do_SUBCOMMAND, which
# a script may define or redefine after sourcing this file. OPTS keeps the options (everything
# before `--`), for a script that calls itself again (tpu_queued.sh watch).
tpu_main() {
  local sub=${1:-} arg
  case $sub in
    -h|--help|help) usage; return 0 ;;
    '') usage >&2; exit 2 ;;
  esac
  shift
  if ! [[ $sub =~ ^[a-z]+$ ]] || ! declare -F "do_$sub" >/dev/null; then
    die "unknown subcommand '$sub' (see --help)"
  fi
  OPTS=()
  for arg in "$@"; do
    [[ $arg == -- ]] && break
    OPTS+=("$arg")
  done
  init_tpu_options
  parse_tpu_options "$@"
  validate_tpu_options
  "do_$sub"
}
