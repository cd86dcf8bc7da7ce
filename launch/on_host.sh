#!/usr/bin/env bash
# The host side of launch/: runs ON a TPU VM worker (through `gcloud ... ssh --command`), in the
# synced code directory. It starts one command detached from the ssh session, keeps its pid,
# log and exit status per run and per worker, and stops it gracefully.
#
# Usage (on the worker, in the synced code directory; launch/tpu_*.sh run it for you):
#   bash launch/on_host.sh start RUN -- CMD [ARGS...]   start CMD detached (refuses if RUN runs)
#   bash launch/on_host.sh status RUN                   one line (below)
#   bash launch/on_host.sh logs RUN LINES follow|once   tail this worker's log
#   bash launch/on_host.sh stop RUN GRACE_SECONDS       SIGTERM, wait up to GRACE, then SIGKILL
# Example:
#   bash launch/on_host.sh start train -- .venv/bin/python -m visor_jax.main \
#       --config=configs/universal.py --workdir=gs://my-bucket/runs/universal
#
# Files, per worker (a pod's workers each write their own, on their own disk):
#   logs/RUN/worker_ID.log   stdout+stderr        logs/RUN/worker_ID.pid   the command's pid
#   logs/RUN/worker_ID.exit  its exit status      logs/RUN/worker_ID.stop  `stop` was asked
#   logs/RUN/worker_ID.term  a SIGTERM reached the supervisor (the VM is shutting down)
# ID is $TPU_WORKER_ID when the runtime sets it, else the hostname (unique per worker).
# Status: running | exited RC (on its own: finished, or crashed when RC != 0) | stopped RC
# (by `stop`) | terminated RC (preemption) | none. The trainer checkpoints and exits 0 on
# SIGTERM, so an exit status alone cannot tell finished from preempted: the markers do, and
# launch/tpu_queued.sh watch relies on them.
set -euo pipefail

worker_id() {
  if [[ -n ${TPU_WORKER_ID:-} ]]; then printf '%s\n' "$TPU_WORKER_ID"; else hostname; fi
}

die() { printf 'on_host.sh [%s]: %s\n' "$(worker_id)" "$*" >&2; exit 1; }

# alive PIDFILE: the pid in PIDFILE is a live process.
alive() { [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }

start() {
  local run=$1; shift
  [[ ${1:-} == -- ]] && shift
  (($#)) || die "start: no command given"
  local prefix
  prefix=logs/$run/worker_$(worker_id)
  mkdir -p "logs/$run"
  alive "$prefix.pid" && die "run '$run' is already running (pid $(<"$prefix.pid")); stop it first"
  rm -f "$prefix.pid" "$prefix.exit" "$prefix.stop" "$prefix.term"
  printf '=== %s start on %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$*" >>"$prefix.log"
  # setsid: a new session, so the ssh session ending does not hang it up; nohup for the rest.
  setsid nohup bash "${BASH_SOURCE[0]}" _supervise "$prefix" "$@" >>"$prefix.log" 2>&1 </dev/null &
  local i
  for i in $(seq 50); do [[ -s $prefix.pid ]] && break; sleep 0.1; done
  [[ -s $prefix.pid ]] || die "the command did not start; see $prefix.log"
  printf 'started run %s on %s: pid %s, log %s/%s.log\n' \
    "$run" "$(hostname)" "$(<"$prefix.pid")" "$PWD" "$prefix"
}

# _supervise PREFIX CMD...: runs CMD, records its pid and exit status. A SIGTERM reaching this
# supervisor (a VM shutting down signals every process) is only noted: the command gets its own.
_supervise() {
  local prefix=$1; shift
  trap 'touch "$prefix.term"' TERM
  "$@" &
  local pid=$! rc=0
  echo "$pid" >"$prefix.pid"
  # `wait` returns early (status > 128) when a trapped signal arrives; wait again until it exits.
  while true; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  echo "$rc" >"$prefix.exit"
  printf '=== %s exit %s\n' "$(date -u +%FT%TZ)" "$rc"
}

status() {
  local prefix
  prefix=logs/$1/worker_$(worker_id)
  if alive "$prefix.pid"; then echo "running"
  elif [[ -s $prefix.exit && -e $prefix.stop ]]; then echo "stopped $(<"$prefix.exit")"
  elif [[ -s $prefix.exit && -e $prefix.term ]]; then echo "terminated $(<"$prefix.exit")"
  elif [[ -s $prefix.exit ]]; then echo "exited $(<"$prefix.exit")"
  elif [[ -e $prefix.pid ]]; then echo "exited unknown"  # killed with its supervisor
  else echo "none"
  fi
}

logs() {
  local log
  log=logs/$1/worker_$(worker_id).log
  [[ -e $log ]] || die "no log $log (has run '$1' been started here?)"
  if [[ $3 == follow ]]; then exec tail -n "$2" -F "$log"; else tail -n "$2" "$log"; fi
}

stop() {
  local prefix grace=$2 i
  prefix=logs/$1/worker_$(worker_id)
  if ! alive "$prefix.pid"; then echo "run '$1' is not running on $(hostname)"; return 0; fi
  local pid
  pid=$(<"$prefix.pid")
  touch "$prefix.stop"
  kill -TERM "$pid"  # the trainer checkpoints the step in flight and exits 0
  for ((i = 0; i < grace; i++)); do
    kill -0 "$pid" 2>/dev/null || { echo "stopped run '$1' on $(hostname)"; return 0; }
    sleep 1
  done
  kill -KILL "$pid" 2>/dev/null || true
  echo "run '$1' on $(hostname) ignored SIGTERM for ${grace}s: killed"
}

case ${1:-} in
  start) shift; (($# >= 1)) || die "usage: start RUN -- CMD..."; start "$@" ;;
  _supervise) shift; _supervise "$@" ;;
  status) (($# == 2)) || die "usage: status RUN"; status "$2" ;;
  logs) (($# == 4)) || die "usage: logs RUN LINES follow|once"; logs "$2" "$3" "$4" ;;
  stop) (($# == 3)) || die "usage: stop RUN GRACE_SECONDS"; stop "$2" "$3" ;;
  *) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; [[ ${1:-} =~ ^(-h|--help)$ ]] ;;
esac
