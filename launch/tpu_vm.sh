#!/usr/bin/env bash
# Runs a visor_jax config on every worker of a TPU VM slice (multi-host: each worker runs the
# same command; jax.distributed.initialize() picks up the TPU environment).
#
#   launch/tpu_vm.sh TPU_NAME ZONE WORKDIR CONFIG [extra flags...]
#   launch/tpu_vm.sh my-v5e-64 us-west4-a gs://bucket/runs/universal \
#       "configs/universal.py:model=llava_ov_0_5b,source=json" --config.init_from=gs://...
set -euo pipefail
TPU=$1 ZONE=$2 WORKDIR=$3 CONFIG=$4; shift 4
REPO=${REPO:-~/visor_jax}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO
  [ -d .venv ] || (python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
      && .venv/bin/pip install -q 'jax[tpu]==0.10.2')
  .venv/bin/python -m visor_jax.main --config='$CONFIG' --workdir='$WORKDIR' \
      --config.distributed=True $*
"
