#!/usr/bin/env bash
# One TPU VM (a single host): create it, ship this checkout, install, run visor_jax.main
# detached with a log, follow the log, stop gracefully, delete. See docs/launch.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEFAULT_TYPE=v5litepod-8
DEFAULT_VERSION=v2-alpha-tpuv5-lite
DEFAULT_WORKER=0
DISTRIBUTED=0  # one host: one process, no jax.distributed

usage() {
  cat <<USAGE
Usage: launch/tpu_vm.sh SUBCOMMAND [options] [-- visor_jax.main flags...]

One TPU VM (single host). Subcommands:
  create    gcloud compute tpus tpu-vm create (--type, --version, --spot)
  sync      copy this checkout (tracked + untracked files, no .venv/.git) to the VM
  install   venv with Python --python (via uv $UV_VERSION), requirements.txt, jax[tpu]
  run       start python -m visor_jax.main --config --workdir FLAGS detached (setsid+nohup),
            logging to ~/REMOTE_DIR/logs/RUN/worker_HOST.log
  up        sync + install + run
  status    running | exited RC | stopped RC | terminated RC | none (docs/launch.md)
  logs      tail -F the log (--lines N, --no-follow)
  stop      SIGTERM (the trainer checkpoints and exits 0), SIGKILL after --grace seconds
  delete    gcloud compute tpus tpu-vm delete

Options (environment defaults in brackets):
  --name NAME          TPU VM name [\$VISOR_TPU_NAME]
  --zone ZONE          zone [\$VISOR_TPU_ZONE]
  --project PROJECT    gcloud project [\$VISOR_PROJECT, else gcloud's default]
  --type TYPE          accelerator type [\$VISOR_TPU_TYPE, $DEFAULT_TYPE]
  --version VERSION    TPU runtime [\$VISOR_TPU_VERSION, $DEFAULT_VERSION]
  --spot               create a Spot VM (for restarts after preemption: tpu_queued.sh)
  --workdir DIR        the run's workdir, gs://... in real use [\$VISOR_WORKDIR]
  --config CONFIG      [\$VISOR_CONFIG, configs/universal.py]
  --run RUN            a name for the run's logs, several runs per VM [\$VISOR_RUN, train]
  --remote-dir DIR     code directory on the VM, relative to its home
                       [\$VISOR_REMOTE_DIR, visor_jax]
  --python VERSION     Python of the VM's venv [\$VISOR_PYTHON, 3.11.7]
  --lines N            logs: lines to show [100]
  --no-follow          logs: print and return instead of following
  --grace SECONDS      stop: wait this long after SIGTERM before SIGKILL [600]
  -n, --dry-run        print the commands instead of running them
  -h, --help           this help

Example:
  export VISOR_TPU_NAME=visor-v5e VISOR_TPU_ZONE=us-west4-a
  launch/tpu_vm.sh create
  launch/tpu_vm.sh up --workdir gs://my-bucket/runs/universal \\
      --config 'configs/universal.py:model=llava_ov_0_5b,source=json' \\
      -- --config.data.json_path=/data/si.jsonl --config.data.text_buckets='(256,512,1024)'
  launch/tpu_vm.sh logs
  launch/tpu_vm.sh stop && launch/tpu_vm.sh delete
USAGE
}

tpu_main "$@"
