"""A tiny, fast training config and helpers shared by the trainer tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from visor_jax.training import config as train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Mechanics tests (resume, meshes, init_from) skip the evaluation at the end of a run.
NO_EVAL = dict(eval_items=0, eval_batches=0)
SYNTHETIC = dict(synthetic_sizes=dict(train=32, validation=8, test=8), synthetic_min_side=256,
                 synthetic_max_side=384)
# The same settings as command-line overrides, for subprocess runs of visor_jax.main.
FLAGS = [
    "--config.data.synthetic_sizes.train=32", "--config.data.synthetic_sizes.validation=8",
    "--config.data.synthetic_sizes.test=8", "--config.data.synthetic_min_side=256",
    "--config.data.synthetic_max_side=384", "--config.eval_batches=1",
    "--config.eval_items=4", "--config.eval_max_new_tokens=4",
]
NO_EVAL_FLAGS = ["--config.eval_items=0", "--config.eval_batches=0"]


def tiny_config(synthetic_dir: str, **overrides):
  c = train_config.default("tiny")
  c.data.update(SYNTHETIC)
  c.data.synthetic_dir = synthetic_dir
  c.data.batch_size = 4
  c.num_steps = 6
  c.log_every = 1
  c.ckpt_every = 3
  c.eval_batches = 1
  c.eval_items = 4
  c.eval_max_new_tokens = 4
  c.async_ckpt = False
  c.mesh = dict(data=1, fsdp=1, tensor=1, num_devices=1)
  c.update(overrides)
  return c


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def step_losses(workdir: str) -> dict[int, float]:
  """Per-step training loss (the step rows: those with 'budget'; a resume rewrites the rows after
  its checkpoint, so each step has one)."""
  out = {}
  for r in read_metrics(workdir):
    if "budget" in r:
      out[r["step"]] = r["loss"]
  return out


def env(fast_compile: bool = True) -> dict:
  """A subprocess's environment: the suite's compilation cache (conftest), one CPU device
  (like a user's laptop), and the fast-compile flags unless the run is long enough for XLA's
  optimisations to pay for themselves."""
  from conftest import FAST_COMPILE
  e = dict(os.environ)
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  e["XLA_FLAGS"] = FAST_COMPILE if fast_compile else ""
  return e


def main_command(workdir: str, config: str = "configs/universal.py:model=tiny,batch=4",
                 *extra: str) -> list[str]:
  return [sys.executable, "-m", "visor_jax.main", f"--config={config}", f"--workdir={workdir}",
          *FLAGS, *extra]


def run_main(workdir: str, *extra: str, config=None, timeout=600):
  cmd = main_command(workdir, config or "configs/universal.py:model=tiny,batch=4", *extra)
  return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=timeout)
