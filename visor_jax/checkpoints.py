"""Orbax checkpoints of a training run: self-describing, so a run loads anywhere.

Layout: <workdir>/checkpoints/<step>/{state, data, config, model, tokenizer, image_processor}.
  state      params, optimizer state and step (sharded arrays, restored onto whatever mesh
             the restoring run uses)
  data       the grain iterator state (one JSON file per process): a resumed run sees exactly
             the batches an uninterrupted one would
  config     the experiment config (JSON)
  model      the *resolved* model geometry the params were built for (a `config.model` dict,
             after `init_from`'s config.json and the experiment's settings were merged)
  tokenizer  the tokenizer's files ({name: text}: tokenizer.json, and tokenizer_config.json
             etc. when the run started from a transformers directory)
  image_processor  how the run preprocessed its images (preprocessor_config.json's fields:
             `ImageProcessorSpec.to_hf_dict()`), e.g. an `init_from` checkpoint's mean/std;
             absent from checkpoints written before it was kept (they used the default)

So nothing outside the checkpoint is needed to load it: `runs.load_run` reads these items.
Restore order used by `training/train.py`: this run's latest checkpoint → `config.init_from`
(any run `runs.load_run` reads) → scratch.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import grain
import orbax.checkpoint as ocp

from visor_jax import paths

log = logging.getLogger(__name__)
ITEMS = ("state", "data", "config", "model", "tokenizer", "image_processor")


class Checkpointer:
  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = paths.normalize(paths.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        paths.as_path(self.directory),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True),
        item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, config: Any, model: Any,
           tokenizer_files: dict[str, str], *, image_processor: dict | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved.
    `model`: the resolved model ConfigDict; `tokenizer_files`: `Tokenizer.files`;
    `image_processor`: `ImageProcessorSpec.to_hf_dict()` (None: not saved, read back as the
    geometry's default)."""
    as_json = lambda c: json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") \
        else c
    args = dict(state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(as_json(config)),
                model=ocp.args.JsonSave(as_json(model)),
                tokenizer=ocp.args.JsonSave(dict(tokenizer_files)))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if image_processor is not None:
      args["image_processor"] = ocp.args.JsonSave(dict(image_processor))
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
  """A run's workdir, its checkpoints dir, or one step dir → (checkpoints dir, step or None).
  Local or `gs://` (`paths`)."""
  path = paths.normalize(path)
  if paths.basename(path).isdigit():
    return paths.dirname(path), int(paths.basename(path))
  if paths.isdir(paths.join(path, "checkpoints")):
    return paths.join(path, "checkpoints"), None
  return path, None


def _reader(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(paths.as_path(directory), item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))


def _step(path: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
  """(a reader of the run's checkpoints, the step: `step`, a step dir's, else the latest)."""
  directory, dir_step = checkpoint_dir(path)
  manager = _reader(directory)
  steps = sorted(manager.all_steps())
  step = step if step is not None else dir_step if dir_step is not None else (
      steps[-1] if steps else None)
  if step is None or step not in steps:
    raise FileNotFoundError(f"{path}: no Orbax checkpoint"
                            f"{'' if step is None else f' of step {step}'} (have {steps}).")
  return manager, step


def read_run(path: str, step: int | None = None) -> dict:
  """A run's description without its arrays: {'config', 'model' (ConfigDicts), 'tokenizer'
  ({file name: text}), 'image_processor' (a dict, or None when not saved), 'step'} of `step`,
  a step dir's step, or the latest."""
  import ml_collections
  manager, step = _step(path, step)
  names = ("config", "model", "tokenizer")
  on_disk = set(paths.listdir(paths.join(str(manager.directory), str(step))))
  missing = [n for n in names if n not in on_disk]
  if missing:
    raise ValueError(f"{path} step {step}: the checkpoint has no {missing} item(s); it was "
                     "written before runs were self-describing (it cannot be loaded on its "
                     "own).")
  if "image_processor" in on_disk:
    names += ("image_processor",)
  raw = manager.restore(step, args=ocp.args.Composite(
      **{n: ocp.args.JsonRestore() for n in names}))
  return dict(config=ml_collections.ConfigDict(raw["config"]),
              model=ml_collections.ConfigDict(raw["model"]), tokenizer=dict(raw["tokenizer"]),
              image_processor=raw.get("image_processor"), step=step)


def restore_params(path: str, abstract_params: Any, step: int | None = None) -> Any:
  """Params of a run's checkpoint (`step`, a step dir's, or the latest), placed as the
  ShapeDtypeStructs of `abstract_params` say. Only the params subtree is read."""
  manager, step = _step(path, step)
  item = {"params": abstract_params}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored["state"]["params"]
