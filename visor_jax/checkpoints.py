"""Orbax checkpoints of a training run: train state, data iterator, config.

Layout: <workdir>/checkpoints/<step>/{state, data, config}. `state` holds params, optimizer
state and step (sharded arrays, restored onto whatever mesh the restoring run uses); `data` is
the grain iterator state (one JSON file per process), so a resumed run sees exactly the batches
an uninterrupted one would; `config` is the run's config as JSON, for provenance.

Restore order used by `train.py`: this run's latest checkpoint → `config.init_from` (a
transformers directory or another run's Orbax checkpoint) → scratch.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, config: Any, *,
           force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved."""
    args = dict(state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """State restored with the shardings of `abstract_state` (ShapeDtypeStructs with
    `.sharding`), so a checkpoint written on one mesh loads onto another."""
    args = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    log.info("checkpoint: restored step %d from %s", step, self.directory)
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def checkpoint_dir(path: str) -> tuple[str, int | None]:
  """A run's workdir, its checkpoints dir, or one step dir → (checkpoints dir, step or None)."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  return path, None


def _reader(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=("state", "data", "config"),
                               options=ocp.CheckpointManagerOptions(read_only=True))


def read_run_config(path: str, step: int | None = None):
  """(the experiment config a run saved with its checkpoint, that step): the latest step, the
  step of a step dir, or `step`."""
  import ml_collections
  directory, dir_step = checkpoint_dir(path)
  manager = _reader(directory)
  steps = list(manager.all_steps())
  step = step if step is not None else dir_step if dir_step is not None else (
      max(steps) if steps else None)
  if step is None or step not in steps:
    raise FileNotFoundError(f"{path}: no Orbax checkpoint{'' if step is None else f' of step {step}'}"
                            f" (have {sorted(steps)}).")
  raw = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return ml_collections.ConfigDict(raw), step


def restore_params_from(path: str, abstract_params: Any) -> Any:
  """Params of another run's Orbax checkpoint (its latest step, or `path` = a step dir)."""
  directory, step = checkpoint_dir(path)
  manager = _reader(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"init_from={path}: no Orbax checkpoint found.")
  # Only the params subtree: another run's optimizer state is not wanted.
  item = {"params": abstract_params}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored["state"]["params"]
