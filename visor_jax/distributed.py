"""Multi-host: joining the processes of a run, and the few host-side agreements training needs.

One process per host (a TPU VM worker, a SLURM task, or several on one machine for tests),
each driving its local devices; every process runs the same program on its own shard of the
data (`data/pipeline.py` shards records by `jax.process_index()`).

Joining (`initialize`), first match wins:
  1. explicit: `config.coordinator_address` + `num_processes` + `process_id`, else the
     environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
     (what the multi-host test sets: several processes on one machine);
  2. auto-detected: `config.distributed=True` (what `launch/` passes) →
     `jax.distributed.initialize()`, which reads
     the TPU pod slice's metadata or SLURM's environment;
  3. neither: one process, nothing to join.

Only process 0 writes what there is one of (metrics, TensorBoard, evaluation outputs, the
embedded dataset); Orbax writes checkpoints from every process (each saves its own shards) and
needs a directory all processes see.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

log = logging.getLogger(__name__)
ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def join_settings(config) -> dict | None:
  """`jax.distributed.initialize` keyword arguments this run asks for; {} for auto-detection;
  None for a single-process run. Explicit settings must be complete."""
  address = config.get("coordinator_address") or os.environ.get(ENV[0], "")
  num = int(config.get("num_processes") or os.environ.get(ENV[1]) or 0)
  pid = config.get("process_id", -1)
  pid = int(pid if pid is not None and pid >= 0 else os.environ.get(ENV[2], -1))
  if address or num or pid >= 0:
    if not (address and num > 0 and 0 <= pid < num):
      raise ValueError(
          "multi-host: coordinator_address, num_processes and process_id go together (config "
          f"fields, or ${ENV[0]} / ${ENV[1]} / ${ENV[2]}); got address={address!r}, "
          f"num_processes={num}, process_id={pid}.")
    return dict(coordinator_address=address, num_processes=num, process_id=pid)
  return {} if config.get("distributed") else None


def initialize(config) -> None:
  """Joins the run's processes (see the module docstring); a no-op when already joined or
  single-process. Must run before anything asks JAX for devices."""
  settings = join_settings(config)
  if settings is None or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(**settings)
  log.info("process %d of %d joined (%d local devices, %d global)", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all reached the same `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], Any], name: str) -> Any:
  """`fn()` on process 0, then on the others once it has finished: for work whose result is
  shared on disk (building the embedded dataset), which must not run twice concurrently."""
  if is_primary():
    out = fn()
    barrier(name)
    return out
  barrier(name)
  return fn()


def allgather_json(value: Any) -> list[Any]:
  """Every process's `value` (JSON-serialisable), in process order: for host-side results
  of different lengths or keys (per-host eval statistics, batch counts)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in
          zip(np.asarray(gathered), np.asarray(sizes).reshape(-1))]


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded over the batch (leading) axis, in order; the
  whole array when it is fully addressable (one process)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0 if s.index else 0
    shards.setdefault(start, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)]) if shards else np.zeros(
      (0,) + x.shape[1:], x.dtype)


def fetchable(x):
  """`x` as something the host can read: itself when this process holds all of it (one
  process, or replicated), else its value gathered from every process (numpy)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return x
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)
