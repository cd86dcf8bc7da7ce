"""Device mesh and the one logical-axis rules table (MaxText style).

Modules name logical axes only ('embed', 'mlp', 'vocab', 'layers', ...). The config's
`sharding_rules` maps each logical name to mesh axes; this file turns those names into
`NamedSharding`s. A dimension whose size the mesh axes do not divide is replicated (logged),
so one rules table serves every model size and mesh.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# Default rules: FSDP over the model width, tensor parallelism over heads/MLP/vocab.
DEFAULT_RULES = (
    ("batch", BATCH),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("patch", None),
)


def make_mesh(shape: dict[str, int] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 (takes the remaining devices).

  `shape['num_devices']` (optional, 0 = all) uses only the first N devices, e.g. to compare a
  one-device run with a sharded one in the same process.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = int(shape.get("num_devices", 0) or 0)
  if n:
    if n > len(devices):
      raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices exist.")
    devices = devices[:n]
  sizes = [int(shape[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} available.")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """Logical axis names of one array → a PartitionSpec, replicating undividable dims."""
  table = dict((k, v) for k, v in rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      log.info("replicating dim %s (%d) of logical axis %r: not divisible by %s",
                   name, dim, name, axes)
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules) -> dict:
  """NamedShardings for every parameter (as a pure nested dict, like the params themselves),
  from the logical axes each Param carries. `model` may be abstract (`nnx.eval_shape`)."""
  flat = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    flat[path] = NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))
  return traverse_util.unflatten_dict(flat)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over data × fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


# The innermost `activation_mesh` context is last: (mesh, whether the step runs on XLA:CPU).
_ACTIVATION_MESHES: list[tuple[Mesh, bool]] = []


@contextlib.contextmanager
def activation_mesh(mesh: Mesh, runs_on_cpu: bool = False):
  """While tracing inside it, `constrain_batch` splits activations over `mesh`. Our own context,
  not `jax.set_mesh`: under that, flax reads the parameters' logical axis names ('embed', ...)
  as mesh axes and fails. The trainer and the dry run enter it around their train step.

  `runs_on_cpu=True` (the trainer on the CPU backend) works around two deadlocks of XLA:CPU's
  in-process collectives, fake devices of one program waiting 40 s for each other, then abort:
  - activations are left to GSPMD (`constrain_batch` does nothing): constrained, two devices
    waited at different all-gathers, about 1 run in 3 with a warm compilation cache;
  - blockwise attention computes every block pair (`skips_need_collectives`).
  The dry run plans for an accelerator and only compiles, so it leaves it False."""
  _ACTIVATION_MESHES.append((mesh, runs_on_cpu))
  try:
    yield mesh
  finally:
    _ACTIVATION_MESHES.pop()


def skips_need_collectives() -> bool:
  """True while tracing a step that runs on XLA:CPU with its batch split over several devices.

  Blockwise attention skips a block pair that no sample of the batch sees into: an `any` over
  the batch, a collective when the batch is split. Inside the layer's `lax.switch` that
  collective runs in a conditional, where XLA:CPU's in-process all-reduce deadlocked (8 fake
  devices, the reproduction's stage 1, 6 December 2026). There blockwise computes every block
  pair instead (masked, so exact). Accelerators keep the skip."""
  if not _ACTIVATION_MESHES:
    return False
  mesh, runs_on_cpu = _ACTIVATION_MESHES[-1]
  return runs_on_cpu and math.prod(mesh.shape[a] for a in BATCH) > 1


def constrain_batch(x: jax.Array) -> jax.Array:
  """An activation float[B, ...] kept split over (data, fsdp) on its leading (batch) axis,
  the rest replicated, inside `activation_mesh`; unchanged otherwise (one device, tests,
  serving).

  Why: with FSDP the weights are split over 'embed' too, and GSPMD, left alone, followed them:
  activations split over the model width with the batch replicated, so per-device
  temporaries barely fell as devices were added (dry run, 0.5B, 1 sample per device:
  37 GiB on 1 device, 199 GiB on 8; 32 GiB on 8 with this). The models call it on each
  layer's input and output (MaxText's activation constraints), so weights are all-gathered
  instead."""
  if not _ACTIVATION_MESHES or _ACTIVATION_MESHES[-1][1]:
    return x
  mesh = _ACTIVATION_MESHES[-1][0]
  axes = tuple(a for a in BATCH if mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1)))))


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh,
              host_fields: Sequence[str] = ()) -> dict[str, jax.Array]:
  """This host's batch → global arrays, batch axis split over (data, fsdp). `host_fields`
  (e.g. `pipeline.HOST_FIELDS`: per-host statistics and labels, not model inputs) are
  dropped."""
  return {k: global_rows(v, mesh) for k, v in local_batch.items() if k not in host_fields}


def global_rows(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """This host's rows → the global array whose batch (leading) axis spans every host's rows,
  in process order, split over (data, fsdp). One process: `local` itself, placed."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(local)), local)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of (sharded) arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
    total += int(np.prod(shard)) * x.dtype.itemsize
  return total
