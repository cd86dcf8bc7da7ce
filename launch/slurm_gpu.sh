#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, each driving its node's GPUs,
# joined by jax.distributed.initialize() (it auto-detects SLURM) via --config.distributed=True.
# `submit` hands this same script to sbatch, which runs its `run` inside the allocation. See
# docs/launch.md.
set -euo pipefail
# Under sbatch this file runs from SLURM's spool copy: `submit` exports VISOR_REPO for it.
# shellcheck source=launch/lib.sh
source "${VISOR_REPO:-$(dirname "${BASH_SOURCE[0]}")/..}/launch/lib.sh"

usage() {
  cat <<USAGE
Usage: launch/slurm_gpu.sh SUBCOMMAND [options] [-- visor_jax.main flags...]

Subcommands:
  submit   sbatch a job of --nodes nodes x --gpus-per-node GPUs (one task per node) that runs
           this script's \`run\`; prints the job id. The job's own output goes to
           LOG_DIR/JOBNAME-JOBID.log (LOG_DIR: WORKDIR/slurm_logs unless --log-dir)
  run      srun VENV/bin/python -m visor_jax.main --config --workdir --config.distributed=True
           FLAGS, one task per node, node N logging to LOG_DIR/JOBNAME-JOBID-nodeN.log. Inside
           an allocation (sbatch, salloc) it uses it; outside, srun allocates one and waits.
  logs     tail -F one node's log of a job (--job, else the newest; --node N, default 0);
           give the run's --workdir (or --log-dir)
  stop     scancel --signal=TERM: every task checkpoints the step in flight and exits 0

Options (environment defaults in brackets):
  --nodes N            [\$VISOR_NODES, 2]
  --gpus-per-node G    [\$VISOR_GPUS_PER_NODE, 8]
  --partition P        [\$VISOR_PARTITION, the cluster's default]
  --time T             time limit, e.g. 24:00:00 [\$VISOR_TIME, the partition's default]
  --account A          [\$VISOR_ACCOUNT]
  --job-name NAME      [\$VISOR_JOB_NAME, visor]
  --venv DIR           venv with requirements.txt and jax[cuda12] [\$VISOR_VENV, REPO/.venv]
  --workdir DIR        the run's workdir, on storage every node sees [\$VISOR_WORKDIR]
  --config CONFIG      [\$VISOR_CONFIG, configs/universal.py]
  --log-dir DIR        [\$VISOR_LOG_DIR, WORKDIR/slurm_logs]
  --grace SECONDS      SIGTERM this long before the time limit (sbatch --signal) [300]
  --requeue            let SLURM requeue the job (preemption, node failure); it resumes
  --sbatch ARG         one more sbatch argument (repeatable), e.g. --sbatch=--qos=high
  --job ID             logs/stop: the job [\$SLURM_JOB_ID; logs: the newest]
  --node N             logs: the node's log [0]
  --lines N            logs: lines to show [100]
  --no-follow          logs: print and return instead of following
  -n, --dry-run        print the commands instead of running them
  -h, --help           this help

Example:
  launch/slurm_gpu.sh submit --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
      --workdir /shared/runs/universal \\
      --config 'configs/universal.py:model=llava_ov_0_5b,source=json' \\
      -- --config.data.json_path=/shared/data/si.jsonl --config.data.text_buckets='(256,512,1024)'
  launch/slurm_gpu.sh logs --workdir /shared/runs/universal --node 3
USAGE
}

init_options() {
  NODES=${VISOR_NODES:-2}
  GPUS=${VISOR_GPUS_PER_NODE:-8}
  PARTITION=${VISOR_PARTITION:-}
  TIME=${VISOR_TIME:-}
  ACCOUNT=${VISOR_ACCOUNT:-}
  JOB_NAME=${VISOR_JOB_NAME:-visor}
  VENV=${VISOR_VENV:-$REPO_ROOT/.venv}
  WORKDIR=${VISOR_WORKDIR:-}
  CONFIG=${VISOR_CONFIG:-configs/universal.py}
  LOG_DIR=${VISOR_LOG_DIR:-}
  GRACE=300
  REQUEUE=0
  SBATCH_ARGS=()
  JOB=${SLURM_JOB_ID:-}
  NODE=0
  LINES=100
  FOLLOW=1
  DRY_RUN=0
  EXTRA=()
}

parse_options() {
  local opt val
  while (($#)); do
    opt=$1
    case $opt in
      --) shift; EXTRA=("$@"); return 0 ;;
      -h|--help) usage; exit 0 ;;
      -n|--dry-run) DRY_RUN=1; shift; continue ;;
      --requeue) REQUEUE=1; shift; continue ;;
      --no-follow) FOLLOW=0; shift; continue ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
      --*) (($# >= 2)) || die "$opt needs a value"; val=$2; shift 2 ;;
      *) die "unexpected argument '$opt' (flags for visor_jax.main go after --; see --help)" ;;
    esac
    case $opt in
      --nodes) NODES=$val ;;
      --gpus-per-node) GPUS=$val ;;
      --partition) PARTITION=$val ;;
      --time) TIME=$val ;;
      --account) ACCOUNT=$val ;;
      --job-name) JOB_NAME=$val ;;
      --venv) VENV=$val ;;
      --workdir) WORKDIR=$val ;;
      --config) CONFIG=$val ;;
      --log-dir) LOG_DIR=$val ;;
      --grace) GRACE=$val ;;
      --sbatch) SBATCH_ARGS+=("$val") ;;
      --job) JOB=$val ;;
      --node) NODE=$val ;;
      --lines) LINES=$val ;;
      *) die "unknown option $opt (see --help)" ;;
    esac
  done
}

# absolute PATH: PATH made absolute (the job runs elsewhere, and `run` changes directory);
# a URL (gs://...) as it is.
absolute() {
  if [[ $1 == *://* || $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi
}

# allocation_args: sbatch's (or a standalone srun's) resource request.
allocation_args() {
  ALLOC=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS")
  [[ -n $PARTITION ]] && ALLOC+=(--partition="$PARTITION")
  [[ -n $TIME ]] && ALLOC+=(--time="$TIME")
  [[ -n $ACCOUNT ]] && ALLOC+=(--account="$ACCOUNT")
  return 0
}

need_log_dir() {
  [[ -n $LOG_DIR ]] || die "--workdir (or --log-dir) is required"
  [[ $LOG_DIR != *://* ]] || die "SLURM writes logs to a file system: give --log-dir"
}

do_submit() {
  [[ -n $WORKDIR ]] || die "--workdir is required (or set VISOR_WORKDIR)"
  need_log_dir
  allocation_args
  local requeue=()
  ((REQUEUE)) && requeue=(--requeue)
  run mkdir -p "$LOG_DIR"
  # --signal=TERM@GRACE: the tasks get SIGTERM GRACE seconds before the time limit, checkpoint
  # and exit 0. VISOR_REPO: sbatch exports the environment; the spooled script finds lib.sh.
  run env VISOR_REPO="$REPO_ROOT" sbatch --parsable "${ALLOC[@]}" "${requeue[@]}" \
    --signal=TERM@"$GRACE" --chdir="$REPO_ROOT" --output="$LOG_DIR/%x-%j.log" \
    "${SBATCH_ARGS[@]}" "$REPO_ROOT/launch/slurm_gpu.sh" run --venv="$VENV" \
    --workdir="$WORKDIR" --config="$CONFIG" --log-dir="$LOG_DIR" -- "${EXTRA[@]}"
}

do_run() {
  [[ -n $WORKDIR ]] || die "--workdir is required (or set VISOR_WORKDIR)"
  need_log_dir
  local srun_args=(--kill-on-bad-exit=1 --output="$LOG_DIR/%x-%j-node%n.log")
  if [[ -n ${SLURM_JOB_ID:-} ]]; then  # inside an allocation: one task on each of its nodes
    srun_args=(--ntasks-per-node=1 "${srun_args[@]}")
  else  # srun asks for an allocation itself
    allocation_args
    srun_args=("${ALLOC[@]}" "${srun_args[@]}")
  fi
  run mkdir -p "$LOG_DIR"
  cd "$REPO_ROOT"  # the config path is relative to the repository
  run srun "${srun_args[@]}" "$VENV/bin/python" -m visor_jax.main --config="$CONFIG" \
    --workdir="$WORKDIR" --config.distributed=True "${EXTRA[@]}"
}

do_logs() {
  need_log_dir
  local log='' f matches
  if [[ -n $JOB ]]; then matches=("$LOG_DIR"/*-"$JOB"-node"$NODE".log)
  else matches=("$LOG_DIR"/*-node"$NODE".log)
  fi
  for f in "${matches[@]}"; do  # the newest
    [[ -e $f && ( -z $log || $f -nt $log ) ]] && log=$f
  done
  [[ -n $log ]] || die "no log of node $NODE${JOB:+ of job $JOB} in $LOG_DIR"
  if ((FOLLOW)); then run tail -n "$LINES" -F "$log"; else run tail -n "$LINES" "$log"; fi
}

do_stop() {
  [[ -n $JOB ]] || die "--job is required"
  run scancel --signal=TERM "$JOB"
}

main() {
  local sub=${1:-}
  case $sub in
    -h|--help|help) usage; return 0 ;;
    '') usage >&2; exit 2 ;;
    submit|run|logs|stop) shift ;;
    *) die "unknown subcommand '$sub' (see --help)" ;;
  esac
  init_options
  parse_options "$@"
  VENV=$(absolute "$VENV")
  WORKDIR=${WORKDIR:+$(absolute "$WORKDIR")}
  # The logs live with the run (a directory every node sees), unless --log-dir says otherwise.
  LOG_DIR=${LOG_DIR:-${WORKDIR:+$WORKDIR/slurm_logs}}
  LOG_DIR=${LOG_DIR:+$(absolute "$LOG_DIR")}
  "do_$sub"
}

main "$@"
