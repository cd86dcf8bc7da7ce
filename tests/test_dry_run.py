"""`--config.dry_run=True` (training/dry_run.py): the train step compiled for a mesh with
abstract weights; per-device memory, FLOPs, shardings and step time, nothing built or written.

One compile serves the file: the module fixture runs the command line (absl flags, then
`visor_jax.main.run`) on the 8 fake devices of conftest.py; the in-process call compiles the
same program again, a hit in the suite's persistent compilation cache.
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

from visor_jax import config_lib, sharding
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax.training import config as train_config
from visor_jax.training import dry_run, optim, steps, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = 8
ARGS = ["--config=configs/universal.py:model=tiny,batch=8", "--config.dry_run=True",
        f"--config.mesh.fsdp={FSDP}", "--config.mesh.data=1",
        "--config.data.text_buckets=(64,)", "--config.data.max_text_len=64"]


def _parse(args: list[str], workdir: str):
  from visor_jax import main
  argv = ["visor_jax.main", *args, f"--workdir={workdir}"]
  fv = flags.FlagValues()
  main.define_flags(fv, argv)
  fv(argv)
  return fv.config, fv.workdir


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """(plan, printed text, config, workdir) of the command line, run in process with every data
  source and the checkpointer made to fail if touched."""
  from visor_jax import checkpoints, main
  from visor_jax.data import sources, synthetic
  workdir = str(tmp_path_factory.mktemp("dry") / "workdir")
  config, workdir = _parse(ARGS, workdir)

  def forbidden(*_, **__):
    raise AssertionError("the dry run touched data or checkpoints")

  out = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
    for module, name in ((sources, "source_for"), (sources, "train_iterator"),
                         (sources, "eval_batches"), (synthetic, "build"),
                         (checkpoints, "Checkpointer")):
      mp.setattr(module, name, forbidden)
    plan = main.run(config, workdir)
  return plan, out.getvalue(), config, workdir


def _expected_state(config):
  """Params + optimizer state from eval_shape alone, independent of the dry run."""
  cfg = config_lib.model_config(config.model)
  model = nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.split(model)[1])
  labels = optim.param_labels(params, config.optim.param_groups)
  tx = optim.make_optimizer(config.optim, labels, config.num_steps)
  return cfg, model, jax.eval_shape(lambda p: steps.init_state(p, tx, labels), params)


@pytest.mark.slow  # the module's one compile (~35 s cold, 2 cores)
def test_cli_prints_the_plan_it_returns_and_writes_nothing(cli_run):
  plan, printed, _, workdir = cli_run
  assert isinstance(plan, dry_run.Plan)
  assert printed == plan.format() + "\n"
  assert not os.path.exists(workdir)
  for line in ("per-device memory", "FLOPs per step", "step time at 197 TFLOP/s",
               "largest arrays of params and optimizer state (top 8)", "PartitionSpec"):
    assert line in printed
  assert plan.mesh == {"data": 1, "fsdp": FSDP, "tensor": 1} and plan.fake_devices
  # attention_impl unset means 'blockwise' on CPU; fake devices plan the accelerators' 'xla'
  assert plan.attention_impl == "xla" and "attention 'xla'" in printed
  json.dumps(plan.to_dict())  # the plan serialises (numbers, strings, lists)


@pytest.mark.slow
def test_memory_is_the_sharded_state_and_batch(cli_run):
  plan, _, config, _ = cli_run
  m = plan.memory
  assert all(m[k] > 0 for k in ("arguments", "outputs", "temporaries", "total"))
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
  # The new train state reuses the donated one's buffers.
  assert m["aliased"] >= 0.9 * plan.state_device_bytes
  cfg, _, state = _expected_state(config)
  state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert plan.state_bytes == state_bytes
  batch_bytes = sum(math.prod(s) * np.dtype(dtype).itemsize for s, dtype in
                    ((shape, _batch_dtype(k)) for k, shape in plan.batch.items()))
  budget_bytes = plan.batch["tokens"][0] * cfg.num_layers
  # FSDP splits the state 8 ways (a few small arrays stay replicated: undividable widths,
  # Adam's counts); replicated Adam moments, the bug this test caught, gave 4.8x.
  ideal = (state_bytes + batch_bytes + budget_bytes) / FSDP
  assert ideal <= m["arguments"] <= 1.2 * ideal, (m["arguments"], ideal)


def _batch_dtype(field: str):
  floats = ("pixels", "vis_weight")
  bools = ("text_valid", "vis_newline", "vis_valid", "sample_valid", "truncated")
  return np.float32 if field in floats else np.bool_ if field in bools else np.int32


@pytest.mark.slow
def test_flops_and_step_time(cli_run):
  plan, _, _, _ = cli_run
  a = plan.analytic_flops
  assert 0 < a["min"] <= a["mean"] <= a["max"]
  assert len(plan.budgets) == 3  # tiny: CA-only, one and both SA candidates
  # XLA counts one device's program with each scanned layer once; within a small factor of
  # the analytic count all the same (elementwise work it counts, layers it does not).
  ratio = plan.xla_flops * plan.num_devices / a["mean"]
  assert 0.1 < ratio < 2, ratio
  assert plan.step_seconds("mean") == pytest.approx(a["mean"] / FSDP / 197e12)
  assert plan.step_seconds("mean", plan.mfu) == pytest.approx(plan.step_seconds() / 0.4)


@pytest.mark.slow
def test_largest_arrays_are_split_over_fsdp(cli_run):
  plan, _, _, _ = cli_run
  assert len(plan.largest) == dry_run.TOP_ARRAYS
  assert [x.bytes for x in plan.largest] == sorted((x.bytes for x in plan.largest),
                                                   reverse=True)
  top = plan.largest[0]
  assert "fsdp" in top.spec
  assert math.prod(top.device_shape) * FSDP == math.prod(top.shape)
  # Adam's moments are sharded like their parameters.
  assert any(x.name.startswith("opt_state/") and "/mu/" in x.name and "fsdp" in x.spec
             for x in plan.largest)


@pytest.mark.slow
def test_in_process_plan_equals_the_cli_plan(cli_run):
  cli_plan, _, config, _ = cli_run
  plan = dry_run.make_plan(config)
  assert plan.memory == cli_plan.memory
  assert plan.analytic_flops == cli_plan.analytic_flops
  assert plan.largest == cli_plan.largest


def test_optimizer_state_shardings_mirror_the_params():
  """train.state_shardings: every mu/nu leaf is sharded like the parameter it mirrors."""
  config, _ = _parse(ARGS, "/nonexistent")
  _, model, state = _expected_state(config)
  mesh = sharding.make_mesh(config.mesh)
  param_sh = sharding.param_shardings(model, mesh, config.sharding_rules)
  state_sh = train.state_shardings(state, param_sh, mesh)
  flat_params = {tuple(k.key for k in p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  moments = 0
  for path, s in jax.tree_util.tree_flatten_with_path(state_sh["opt_state"])[0]:
    names = [getattr(k, "name", None) for k in path]
    if "mu" in names or "nu" in names:
      tail = tuple(k.key for k in path[names.index("mu" if "mu" in names else "nu") + 1:])
      assert s == flat_params[tail], tail
      moments += 1
    else:
      assert s.spec == jax.sharding.PartitionSpec()
  assert moments == 2 * len(flat_params)


def test_needed_devices():
  assert dry_run.needed_devices(dict(data=-1, fsdp=64, tensor=1)) == 64
  assert dry_run.needed_devices(dict(data=2, fsdp=4, tensor=2, num_devices=0)) == 16
  assert dry_run.needed_devices(dict(data=-1, fsdp=1, tensor=1, num_devices=4)) == 4


def test_too_many_devices_once_jax_started_names_the_flag():
  jax.devices()  # started with conftest's 8
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    dry_run.plan_devices(dict(data=1, fsdp=16, tensor=1))


def test_fake_devices_are_requested_before_jax_starts():
  code = ("from visor_jax.training import dry_run; import jax; "
          "devices, fake = dry_run.plan_devices(dict(data=-1, fsdp=16, tensor=1)); "
          "print(len(devices), fake)")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout
  assert out.split() == ["16", "True"]


def test_activations_are_split_over_the_batch(monkeypatch):
  """8 devices with one sample each hold about one sample's activations, not eight: the
  models' `sharding.constrain_batch` keeps activations batch-split. (Without it GSPMD split
  them over the FSDP-sharded width and replicated the batch: this ratio was 2.65.)"""
  def temporaries(n):
    c = train_config.apply_variant(train_config.default("small"), f"model=tiny,batch={n}")
    c.mesh.update(data=1, fsdp=n, tensor=1, num_devices=n)
    c.data.text_buckets, c.data.max_text_len = (64,), 64
    return dry_run.make_plan(c).memory["temporaries"]

  assert temporaries(FSDP) < 1.2 * temporaries(1)
