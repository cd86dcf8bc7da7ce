#!/usr/bin/env bash
# A multi-host TPU pod slice: every subcommand acts on all workers (--worker=all); `run` starts
# the same command on every worker with --config.distributed=True (jax.distributed.initialize()
# auto-detects the slice), each worker logging to its own file. See docs/launch.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEFAULT_TYPE=v5litepod-16
DEFAULT_VERSION=v2-alpha-tpuv5-lite
DEFAULT_WORKER=all
DISTRIBUTED=1  # one process per worker, joined by jax.distributed.initialize()

usage() {
  cat <<USAGE
Usage: launch/tpu_pod.sh SUBCOMMAND [options] [-- visor_jax.main flags...]

A multi-host TPU pod slice; everything runs on all workers (--worker=all) unless --worker says
otherwise. Subcommands:
  create    gcloud compute tpus tpu-vm create (--type, --version, --spot)
  sync      copy this checkout (tracked + untracked files, no .venv/.git) to every worker
  install   on every worker: venv with Python --python (via uv $UV_VERSION), requirements.txt,
            jax[tpu]
  run       start python -m visor_jax.main --config --workdir --config.distributed=True FLAGS
            on every worker, detached (setsid+nohup); worker W logs to
            ~/REMOTE_DIR/logs/RUN/worker_HOST.log on its own disk
  up        sync + install + run
  status    one line per worker: running | exited RC | stopped RC | terminated RC | none
  logs      tail -F one worker's log (worker 0 unless --worker N; --lines N, --no-follow)
  stop      SIGTERM on every worker (the trainer checkpoints and exits 0), SIGKILL after --grace
  delete    gcloud compute tpus tpu-vm delete

Options (environment defaults in brackets):
  --name NAME          TPU name [\$VISOR_TPU_NAME]
  --zone ZONE          zone [\$VISOR_TPU_ZONE]
  --project PROJECT    gcloud project [\$VISOR_PROJECT, else gcloud's default]
  --type TYPE          accelerator type [\$VISOR_TPU_TYPE, $DEFAULT_TYPE]
  --version VERSION    TPU runtime [\$VISOR_TPU_VERSION, $DEFAULT_VERSION]
  --spot               create a Spot slice (for restarts after preemption: tpu_queued.sh)
  --worker W           all, or workers: 0, 0,3 or 1-3 [all; logs: 0]
  --workdir DIR        the run's workdir; gs://... (every worker must see the checkpoints)
                       [\$VISOR_WORKDIR]
  --config CONFIG      [\$VISOR_CONFIG, configs/universal.py]
  --run RUN            a name for the run's logs [\$VISOR_RUN, train]
  --remote-dir DIR     code directory on the workers, relative to the home
                       [\$VISOR_REMOTE_DIR, visor_jax]
  --python VERSION     Python of the workers' venv [\$VISOR_PYTHON, 3.11.7]
  --lines N            logs: lines to show [100]
  --no-follow          logs: print and return instead of following
  --grace SECONDS      stop: wait this long after SIGTERM before SIGKILL [600]
  -n, --dry-run        print the commands instead of running them
  -h, --help           this help

Example:
  export VISOR_TPU_NAME=visor-pod VISOR_TPU_ZONE=us-west4-a
  launch/tpu_pod.sh create --type v5litepod-16
  launch/tpu_pod.sh up --workdir gs://my-bucket/runs/stage1 \\
      --config 'configs/stage1.py:model=llava_ov_0_5b,source=json,batch=128' \\
      -- --config.data.text_buckets='(256,512,1024)' --config.mesh.fsdp=-1
  launch/tpu_pod.sh logs --worker 3
  launch/tpu_pod.sh stop && launch/tpu_pod.sh delete
USAGE
}

tpu_main "$@"
