#!/usr/bin/env bash
# Spot TPUs through a queued resource (QR), restarted after preemption: `watch` polls the QR,
# and when it is preempted (or failed, suspended) deletes it, creates it again, ships the code,
# installs and starts the same command, which resumes from its latest checkpoint in --workdir.
# The other subcommands are tpu_pod.sh's, on the QR's node. See docs/launch.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEFAULT_TYPE=v5litepod-16
DEFAULT_VERSION=v2-alpha-tpuv5-lite
DEFAULT_WORKER=all
DISTRIBUTED=1
DEFAULT_SPOT=1  # --on-demand turns it off
SELF=$LAUNCH_DIR/${BASH_SOURCE[0]##*/}

usage() {
  cat <<USAGE
Usage: launch/tpu_queued.sh SUBCOMMAND [options] [-- visor_jax.main flags...]

Spot capacity through a queued resource (QR) whose node is --name; runs on all its workers.
Subcommands:
  create    gcloud compute tpus queued-resources create --spot (queued until capacity exists)
  state     the QR's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...; NOT_FOUND)
  watch     until the run finishes: create the QR if missing; when ACTIVE, sync + install + run;
            when PREEMPTED, FAILED, SUSPENDING or SUSPENDED, delete it, create it again and
            start the same command again (it resumes from --workdir's latest checkpoint)
  sync, install, run, up, status, logs, stop   as in launch/tpu_pod.sh, on the node --name
  delete    gcloud compute tpus queued-resources delete --force (deletes the node too)

Options: those of launch/tpu_pod.sh (see its --help), and
  --qr ID              queued resource id [\$VISOR_QR, NAME-qr]
  --on-demand          queue for on-demand capacity instead of Spot
  --single-host        the node is one host: no --config.distributed=True
  --max-restarts N     watch: give up after N recoveries (recreate or relaunch) [20]
  --poll-seconds S     watch: seconds between polls of the QR's state [60]

Example:
  export VISOR_TPU_NAME=visor-spot VISOR_TPU_ZONE=us-west4-a
  launch/tpu_queued.sh watch --type v5litepod-16 --workdir gs://my-bucket/runs/universal \\
      --config 'configs/universal.py:model=llava_ov_0_5b,source=json,init_from=gs://my-bucket/runs/stage2' \\
      -- --config.data.json_path=/data/si.jsonl --config.data.image_root=/data/images
  launch/tpu_queued.sh logs           # in another terminal
  launch/tpu_queued.sh delete
USAGE
}

QR=${VISOR_QR:-}
MAX_RESTARTS=20
POLL_SECONDS=60

script_flag() {
  case $1 in
    --on-demand) SPOT=0 ;;
    --single-host) DISTRIBUTED=0; DEFAULT_WORKER=0; WORKER=0 ;;
    *) return 1 ;;
  esac
}

script_option() {
  case $1 in
    --qr) QR=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --poll-seconds) POLL_SECONDS=$2 ;;
    *) return 1 ;;
  esac
}

validate_tpu_options() {
  validate_common_options
  QR=${QR:-$NAME-qr}
  [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts takes an integer"
  [[ $POLL_SECONDS =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--poll-seconds takes a number"
}

do_create() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  gcloud_tpus queued-resources create "$QR" --node-id="$NAME" --accelerator-type="$TYPE" \
    --runtime-version="$VERSION" "${spot[@]}"
}

do_delete() { gcloud_tpus queued-resources delete "$QR" --force --quiet; }

# qr_state: the QR's state; NOT_FOUND when it does not exist, UNKNOWN when gcloud failed
# otherwise (a network error must not look like a preemption).
qr_state() {
  local out rc=0
  out=$(gcloud compute tpus queued-resources describe "$QR" --zone="$ZONE" \
    ${PROJECT:+--project="$PROJECT"} --format='value(state.state)' 2>&1) || rc=$?
  if ((rc == 0)); then printf '%s\n' "${out:-UNKNOWN}"
  elif [[ $out == *NOT_FOUND* ]]; then echo NOT_FOUND
  else note "describe failed: $out"; echo UNKNOWN
  fi
}

do_state() {
  if ((DRY_RUN)); then
    run gcloud compute tpus queued-resources describe "$QR" --zone="$ZONE" \
      ${PROJECT:+--project="$PROJECT"} --format='value(state.state)'
  else
    qr_state
  fi
}

# again SUBCOMMAND [OPTION...]: this script, run anew with the watch's options (and flags for
# the trainer): each step fails on its own, with `set -e` in force, without ending the watch.
again() {
  local sub=$1; shift
  "$SELF" "$sub" "${OPTS[@]}" "$@" -- "${EXTRA[@]}"
}

# run_state: worker 0's status line for the run ("HOST: running", ...), or "unreachable".
run_state() {
  local out
  out=$(again status --worker=0 2>/dev/null) || out=unreachable
  printf '%s\n' "${out##*$'\n'}"
}

do_watch() {
  ((DRY_RUN)) && die "watch polls a real queued resource; it has no --dry-run"
  local restarts=0 launched=0 ever_launched=0 state status
  recover() {  # recover WHY: one more recovery, unless the budget is spent
    ((restarts < MAX_RESTARTS)) ||
      die "$1, and --max-restarts $MAX_RESTARTS recoveries are spent: giving up"
    restarts=$((restarts + 1))
    note "$1: recovery $restarts of $MAX_RESTARTS"
  }
  note "watching queued resource $QR (node $NAME) every ${POLL_SECONDS}s"
  while true; do
    state=$(qr_state)
    case $state in
      NOT_FOUND)
        ((ever_launched)) && recover "queued resource $QR is gone"
        note "creating queued resource $QR"
        again create || note "create failed; retrying"
        launched=0
        ;;
      PREEMPTED|FAILED|SUSPENDING|SUSPENDED)
        recover "queued resource $QR is $state"
        if ! { again delete && again create; }; then note "recreate failed; retrying"; fi
        launched=0
        ;;
      ACTIVE)
        if ((!launched)); then
          status=$(run_state)
          if [[ $status == unreachable ]]; then  # a new node may not take ssh at once
            note "node $NAME is not reachable yet"
            sleep "$POLL_SECONDS"
            continue
          elif [[ $status == *": running" ]]; then
            note "the run is already running on $NAME: watching it"
          else
            note "queued resource $QR is ACTIVE: sync, install, run"
            if ! again up; then
              recover "starting the run failed"
              sleep "$POLL_SECONDS"
              continue
            fi
          fi
          launched=1
          ever_launched=1
        else
          status=$(run_state)
          case $status in
            *": exited 0") note "the run finished (worker 0 exited 0)"; return 0 ;;
            *": stopped "*) note "the run was stopped (${status##*: }): watch ends"; return 0 ;;
            *": terminated "*|*": exited unknown"|*": none")
              # SIGTERM reached the VM (preemption under way), the process vanished with its
              # supervisor (a reboot), or the logs are gone: start again. A VM that is going
              # away turns the QR's state into PREEMPTED at the next polls.
              recover "the run was ${status##*: }"
              launched=0
              ;;
            *": exited "*) die "the run failed (${status##*: }); see: ${0##*/} logs" ;;
            *) ;;  # running, or unreachable for a moment
          esac
        fi
        ;;
      *) ;;  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, DELETING, UNKNOWN
    esac
    note "state $state${status:+, run ${status##*: }}"
    status=
    sleep "$POLL_SECONDS"
  done
}

tpu_main "$@"
