"""Plan before paying: `--config.dry_run=True` compiles the train step, reports, and exits.

The trainer's own sections (mesh → model shapes → sharding → update step) run with ABSTRACT
weights and an abstract batch: `nnx.eval_shape` for the model, `jax.eval_shape` for the train
state, `ShapeDtypeStruct`s with the shardings training would use, then `.lower().compile()`.
Nothing is allocated, no data is built, nothing is written (the workdir is not even created).
What it prints and returns (`Plan`):

  * per-device memory from `compiled.memory_analysis()`: arguments, outputs, temporaries and
    their total (outputs aliased to donated arguments, i.e. the new train state, counted once);
  * FLOPs per step, two ways: the analytic count (`visor_jax/flops.py`: forward per sample at
    each training budget, x3 for forward + backward, +1 LLM and SigLIP forward with
    `model.remat`), and XLA's `compiled.cost_analysis()` of the per-device program, which
    counts the body of a while loop ONCE (flops.py) and so misses all but one of the scanned
    SigLIP and LLM layers: a loose lower bound, printed for comparison only;
  * the largest arrays of params and optimizer state: PartitionSpec and per-device shape;
  * the step time at `dry_run_peak_tflops` per device: per-device analytic FLOPs / peak (a
    lower bound: 100% utilisation), and the same divided by `dry_run_mfu`.

Devices: a mesh larger than the machine gets fake CPU devices (`jax_num_cpu_devices`, set
before JAX's backends start; the CPU backend is used when the default one has too few). The
memory numbers are then XLA:CPU's, whose buffer assignment and fusion differ from TPU's: read
them as an estimate of the TPU's.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from visor_jax import budgets as budgets_lib
from visor_jax import config_lib, flops, runs, sharding
from visor_jax.data import pipeline, sources
from visor_jax.models.llava_onevision import LlavaOnevision, abstract_inputs
from visor_jax.training import optim, steps, train

log = logging.getLogger(__name__)

GIB = 2**30
TOP_ARRAYS = 8


@dataclasses.dataclass
class ArrayPlan:
  """One array of the train state and how the mesh splits it."""
  name: str                  # 'params/decoder/layers/mlp/up/kernel', 'opt_state/.../mu/...'
  shape: tuple[int, ...]
  dtype: str
  spec: str                  # its PartitionSpec
  device_shape: tuple[int, ...]  # one device's shard

  @property
  def bytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize

  @property
  def device_bytes(self) -> int:
    return math.prod(self.device_shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass
class Plan:
  """Everything the dry run measured; `format()` is exactly what it prints."""
  mesh: dict[str, int]
  platform: str              # the devices compiled for: 'cpu', 'tpu', ...
  fake_devices: bool         # True: CPU devices standing in for a larger machine
  attention_impl: str        # the attention compiled (unset: the accelerators' 'xla')
  batch: dict[str, tuple[int, ...]]  # global shapes of the step's batch arguments
  grad_accum: int
  params: int                # parameter count
  trainable: int
  state_bytes: int           # params + optimizer state + step, all devices together
  state_device_bytes: int    # the same on one device, from the shardings
  memory: dict[str, int]     # per device: arguments, outputs, aliased, temporaries, total
  xla_flops: float           # cost_analysis of one device's program (loop bodies once)
  analytic_flops: dict[str, float]  # per step, all devices: min / mean / max over budgets
  budgets: list[str]         # the training budgets the analytic count ranges over
  peak_tflops: float
  mfu: float
  largest: list[ArrayPlan]
  compile_s: float

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh.values())

  def step_seconds(self, which: str = "mean", mfu: float = 1.0) -> float:
    """Analytic FLOPs per device / (peak x mfu); `mfu=1` is the lower bound."""
    per_device = self.analytic_flops[which] / self.num_devices
    return per_device / (self.peak_tflops * 1e12 * mfu)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["largest"] = [{**dataclasses.asdict(a), "bytes": a.bytes, "device_bytes": a.device_bytes}
                    for a in self.largest]
    d["step_seconds"] = {"lower_bound": self.step_seconds("mean"),
                         "at_mfu": self.step_seconds("mean", self.mfu),
                         "max_budget_at_mfu": self.step_seconds("max", self.mfu)}
    return d

  def format(self) -> str:
    m, a = self.memory, self.analytic_flops
    devices = (f"{self.num_devices} fake CPU devices (memory from XLA:CPU, not the TPU's)"
               if self.fake_devices else f"{self.num_devices} {self.platform} device(s)")
    batch = ", ".join(f"{k} {list(v)}" for k, v in self.batch.items()
                      if k in ("tokens", "pixels", "vis_src"))
    lines = [
        f"dry run: the train step compiled in {self.compile_s:.1f} s; nothing allocated",
        f"mesh {self.mesh} on {devices}; attention {self.attention_impl!r}",
        f"global batch: {batch}; grad_accum {self.grad_accum}",
        f"parameters {self.params:,} ({self.trainable:,} trainable); params + optimizer state "
        f"{_bytes(self.state_bytes)} in all, {_bytes(self.state_device_bytes)} per device",
        "",
        "per-device memory (compiled.memory_analysis())",
        f"  arguments    {_bytes(m['arguments']):>12}   train state shard + batch shard",
        f"  outputs      {_bytes(m['outputs']):>12}   {_bytes(m['aliased'])} of them aliased "
        "to donated arguments",
        f"  temporaries  {_bytes(m['temporaries']):>12}",
        f"  total        {_bytes(m['total']):>12}   arguments + outputs - aliased + temporaries",
        "",
        "FLOPs per step",
        f"  analytic (flops.py; 3 x forward; all devices)  min {_flops(a['min'])}, mean "
        f"{_flops(a['mean'])}, max {_flops(a['max'])} over {len(self.budgets)} budget(s)",
        f"  XLA cost_analysis (one device's program; a scanned layer counted once)  "
        f"{_flops(self.xla_flops)}",
        "",
        f"step time at {self.peak_tflops:g} TFLOP/s per device (analytic FLOPs, mean budget)",
        f"  lower bound (100% MFU)  {_seconds(self.step_seconds('mean'))}",
        f"  at MFU {self.mfu:g}           {_seconds(self.step_seconds('mean', self.mfu))}"
        f"   (max budget: {_seconds(self.step_seconds('max', self.mfu))})",
        "",
        f"largest arrays of params and optimizer state (top {len(self.largest)})",
    ]
    rows = [(x.name, str(list(x.shape)), x.spec, str(list(x.device_shape)),
             _bytes(x.device_bytes)) for x in self.largest]
    header = ("array", "global shape", "PartitionSpec", "per-device shape", "per device")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
      lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _bytes(b: float) -> str:
  return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.2f} MiB"


def _flops(f: float) -> str:
  for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9)):
    if f >= scale:
      return f"{f / scale:.2f} {unit}"
  return f"{f / 1e6:.2f} MFLOPs"


def _seconds(t: float) -> str:
  return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


# ----------------------------------------------------------------------------- devices


def needed_devices(mesh_cfg) -> int:
  """Devices the configured mesh needs: `num_devices` if set, else the product of the axis
  sizes, a -1 axis counting as 1 (it takes whatever exists)."""
  n = int(mesh_cfg.get("num_devices", 0) or 0)
  return n or math.prod(max(int(mesh_cfg[a]), 1) for a in sharding.MESH_AXES)


def _flag_cpu_devices() -> int:
  """The CPU device count XLA_FLAGS already asks for (tests set 8), else 1."""
  found = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                    os.environ.get("XLA_FLAGS", ""))
  return int(found.group(1)) if found else 1


def request_cpu_devices(n: int) -> bool:
  """Asks for at least `n` CPU devices; only possible before JAX's backends start (the CPU
  devices are then cheap stand-ins, whatever the default backend). False when too late."""
  if n <= _flag_cpu_devices():
    return True
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # a JAX operation already ran: the device count is fixed
    return False
  return True


def plan_devices(mesh_cfg) -> tuple[list[jax.Device], bool]:
  """(devices to build the mesh on, whether they are fake CPU stand-ins)."""
  n = needed_devices(mesh_cfg)
  request_cpu_devices(n)
  devices = jax.devices()
  if len(devices) >= n:
    return devices, devices[0].platform == "cpu" and n > 1
  cpu = jax.devices("cpu")
  if len(cpu) >= n:
    log.info("the mesh needs %d devices, %d %s devices exist: planning on %d CPU devices",
             n, len(devices), devices[0].platform, n)
    return cpu, True
  raise ValueError(f"dry run: the mesh {dict(mesh_cfg)} needs {n} devices, and only "
                   f"{len(cpu)} CPU devices exist (JAX started before the dry run could ask "
                   f"for more: set XLA_FLAGS=--xla_force_host_platform_device_count={n}).")


# ----------------------------------------------------------------------------- shapes


def model_dict(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The geometry training would build: `config.model`, or `init_from`'s (read from its
  config files, never its weights)."""
  if config.init_from:
    return runs.experiment_model_and_tokenizer(config)[0]
  return ml_collections.ConfigDict(config.model.to_dict())


def batch_geometry(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig
                   ) -> tuple[int, int, int, int]:
  """(global batch, text length, visual tokens, crops) of the largest batch training compiles:
  the longest text bucket, `max_visual` / `max_crops` as the pipeline resolves them."""
  d = pipeline.data_config(sources.pipeline_kwargs(config.data))
  max_visual, max_crops = pipeline.visual_limits(cfg)
  return (d.batch_size * jax.process_count(), d.text_buckets[-1],
          d.max_visual or max_visual, d.max_crops or max_crops)


def abstract_batch(cfg: config_lib.ModelConfig, mesh, batch: int, text: int, visual: int,
                   crops: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch argument as `sharding.to_global` makes it from a pipeline batch (every
  field but `pipeline.HOST_FIELDS`), abstract, split over (data, fsdp)."""
  fields = dict(abstract_inputs(cfg, batch, text, crops, visual))
  sds = jax.ShapeDtypeStruct
  fields.update(targets=sds((batch, text), jnp.int32), record_index=sds((batch,), jnp.int32),
                sample_valid=sds((batch,), jnp.bool_), truncated=sds((batch,), jnp.bool_))
  return {k: sds(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, len(v.shape)))
          for k, v in fields.items()}


def _path_name(path) -> str:
  """'params/decoder/embed', or for optimizer state 'opt_state/<group>/<mu|nu>/<param path>'
  (optax's nesting of chain, multi_transform and masking left out)."""
  keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  tail = []  # the trailing run of dict keys: the parameter's path
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    tail.insert(0, str(k.key))
  if keys[0] != "opt_state" or len(tail) == len(keys):
    return "/".join(keys)
  attrs = [str(k.name) for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
  groups = [str(k.key) for k in path[1:len(path) - len(tail)]
            if isinstance(k, jax.tree_util.DictKey)]
  return "/".join(["opt_state", *groups[-1:], *attrs[-1:], *tail])


def largest_arrays(abstract_sharded, top: int = TOP_ARRAYS) -> list[ArrayPlan]:
  """The `top` largest leaves of the (abstract, sharded) train state."""
  found = []
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_sharded)[0]:
    spec = x.sharding.spec if hasattr(x.sharding, "spec") else jax.sharding.PartitionSpec()
    found.append(ArrayPlan(_path_name(path), tuple(x.shape), str(np.dtype(x.dtype)), str(spec),
                           tuple(x.sharding.shard_shape(x.shape))))
  found.sort(key=lambda a: (-a.bytes, a.name))
  return found[:top]


def analytic_step_flops(cfg: config_lib.ModelConfig, layer_sets: Sequence[Sequence[int]],
                        weights, batch: int, text: int, visual: int, crops: int
                        ) -> dict[str, float]:
  """Training FLOPs of one step, all devices: 3 x the forward (forward, then activation and
  weight gradients: an upper bound when parts are frozen) per sample at the padded geometry
  (what the compiled program computes), plus the LLM and SigLIP layers once more with `remat`.
  min / max / mean (under the budget weights) over the training budgets."""
  per_budget = []
  for layers in layer_sets:
    f = flops.forward_flops(cfg, num_crops=crops, num_visual=visual, num_text=text,
                            sa_layers=layers)
    recompute = f["llm"] - f["lm_head"] + f["vision"] if cfg.remat else 0.0
    per_budget.append(batch * (3 * f["total"] + recompute))
  p = np.ones(len(per_budget)) if weights is None else np.asarray(weights, np.float64)
  return {"min": min(per_budget), "max": max(per_budget),
          "mean": float(np.dot(p / p.sum(), per_budget))}


# ----------------------------------------------------------------------------- the plan


def make_plan(config: ml_collections.ConfigDict) -> Plan:
  """Compiles the train step for the configured mesh, model and largest batch; allocates
  nothing, builds no data, writes nothing."""
  # ---------------------------------------------------------------- mesh
  devices, fake = plan_devices(config.mesh)
  mesh = sharding.make_mesh(config.mesh, devices)
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  model = model_dict(config)
  if fake and model.get("attention_impl") is None:
    # None means 'blockwise' on CPU but 'xla' on the TPU/GPU this plan is for: plan that.
    model.attention_impl = "xla"
  cfg = config_lib.model_config(model)
  batch, text, visual, crops = batch_geometry(config, cfg)
  if batch % (data_ways * config.grad_accum):
    raise ValueError(f"data.batch_size={config.data.batch_size} x {jax.process_count()} "
                     f"process(es) must be divisible by mesh data*fsdp={data_ways} "
                     f"x grad_accum={config.grad_accum}.")
  layer_sets = budgets_lib.resolve(config.budgets, cfg, "budgets", allow_all=True)

  # ---------------------------------------------------------------- model shapes
  # From here to the step: train.py's sections of the same names, on abstract values.
  abstract_model = nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model)
  abstract_params = nnx.to_pure_dict(abstract_params)
  labels = optim.param_labels(abstract_params, config.optim.param_groups)
  tx = optim.make_optimizer(config.optim, labels, config.num_steps)
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731

  # ---------------------------------------------------------------- sharding
  param_sh = sharding.param_shardings(abstract_model, mesh, config.sharding_rules)
  abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx, labels), abstract_params)
  state_sh = train.state_shardings(abstract_state, param_sh, mesh)
  budget_sh = sharding.batch_sharding(mesh, 2)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)

  # ---------------------------------------------------------------- update step
  train_step = train.jit_train_step(config, graphdef, tx, labels, train.visor_tr_reduction(config),
                                    state_sh, budget_sh, mesh)
  batch_args = abstract_batch(cfg, mesh, batch, text, visual, crops)
  budget_arg = jax.ShapeDtypeStruct((batch, cfg.num_layers), jnp.bool_, sharding=budget_sh)
  start = time.perf_counter()
  with sharding.activation_mesh(mesh):  # as in training: the models' activation constraints
    compiled = train_step.lower(abstract_sharded, batch_args, budget_arg).compile()
  compile_s = time.perf_counter() - start

  # ---------------------------------------------------------------- report
  mem = compiled.memory_analysis()
  memory = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes)
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Plan(
      mesh={k: int(v) for k, v in mesh.shape.items()}, platform=devices[0].platform,
      fake_devices=fake, attention_impl=str(cfg.attention_impl),
      batch={k: tuple(v.shape) for k, v in batch_args.items()},
      grad_accum=int(config.grad_accum), params=count(abstract_params),
      trainable=count(optim.split(abstract_params, labels)[0]),
      state_bytes=sum(math.prod(x.shape) * x.dtype.itemsize
                      for x in jax.tree.leaves(abstract_state)),
      state_device_bytes=sharding.bytes_per_device(abstract_sharded),
      memory=memory, xla_flops=float(cost.get("flops", 0.0)),
      analytic_flops=analytic_step_flops(cfg, layer_sets, config.budget_weights, batch, text,
                                         visual, crops),
      budgets=[budgets_lib.label(s) for s in layer_sets],
      peak_tflops=float(config.get("dry_run_peak_tflops", 197.0)),
      mfu=float(config.get("dry_run_mfu", 0.4)),
      largest=largest_arrays(abstract_sharded), compile_s=compile_s)


def main(config: ml_collections.ConfigDict) -> Plan:
  """`--config.dry_run=True`: compile, print the plan, return it. Writes nothing. Data paths
  are not checked (a plan may be made away from the data); `init_from` is read for its
  geometry."""
  plan = make_plan(config)
  print(plan.format(), flush=True)
  return plan
