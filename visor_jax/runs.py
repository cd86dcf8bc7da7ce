"""Loading a run: one function for every kind of weights directory.

    run = runs.load_run(path, step=None, mesh=None)
    run.config     the experiment config it trained with (None for a transformers directory)
    run.model      the resolved model geometry (a `config.model` ConfigDict), run.cfg its
                   validated `ModelConfig`
    run.tokenizer  its tokenizer; run.image_spec, run.system_prompt: how it saw its inputs
                   (image_spec: the source's preprocessor_config.json, or what an Orbax run
                   saved; export writes it back out)
    run.params     nested dict of arrays, placed on `mesh` (default: one device)

`path` is any of
  * an Orbax run: a training workdir, its `checkpoints/` directory or one step directory.
    The checkpoint is self-describing (see `checkpoints.py`): it holds the resolved model and
    the tokenizer beside the train state, so nothing outside it is needed to load it (the run's
    `init_from` directory may be long gone);
  * a transformers LLaVA-OneVision directory (`save_pretrained`): LLaVA-OV's weights, and
    VISOR's new parts initialised as the method decides (`hf_import.init_visor_parts`);
  * a directory written by `python -m visor_jax.export` (config.json with a "visor" entry):
    every parameter, VISOR's included, exactly as stored.

Serving, export, router training, evaluation and the trainer's `init_from` all come through
here. `experiment_model_and_tokenizer`, `experiment_image_spec` and `initial_params` are the
trainer's side: what a new run starts from.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from visor_jax import checkpoints, config_lib, paths, sharding
from visor_jax.convert import hf_config, hf_import, torch_export
from visor_jax.data import inputs, preprocess, sources
from visor_jax.data.conversations import DEFAULT_SYSTEM_PROMPT
from visor_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer
from visor_jax.models.llava_onevision import LlavaOnevision

log = logging.getLogger(__name__)

KINDS = ("orbax", "transformers", "export")
# Model fields an experiment decides even when its weights come from elsewhere: VISOR's layout
# and router (new parts, initialised when absent) and how the model computes. Everything else
# (the geometry) comes from the weights' source.
EXPERIMENT_MODEL_KEYS = ("visor", "router", "dtype", "param_dtype", "attention_impl", "remat")
# The subset that never changes a parameter's shape: applied on top of an Orbax or exported
# run's model, whose VISOR parts are trained and must be kept as they are.
COMPUTE_MODEL_KEYS = ("dtype", "param_dtype", "attention_impl", "remat")


@dataclasses.dataclass
class Run:
  kind: str                                   # one of KINDS
  path: str                                   # the directory it was read from
  step: int | None                            # Orbax step (None for the other kinds)
  config: ml_collections.ConfigDict | None    # the experiment config (Orbax runs only)
  model: ml_collections.ConfigDict            # resolved model geometry
  cfg: config_lib.ModelConfig
  tokenizer: Tokenizer
  image_spec: preprocess.ImageProcessorSpec
  system_prompt: str | None
  params: Any = None                          # nested dict of arrays (None: not read yet)
  workdir: str = ""                           # an Orbax run's workdir (its data lives there)

  def build_model(self) -> LlavaOnevision:
    """The nnx model holding `params` (no random init runs)."""
    abstract = nnx.eval_shape(lambda: LlavaOnevision(self.cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, self.params)
    return nnx.merge(graphdef, params, rest)


def kind_of(path: str) -> str:
  """Which of KINDS `path` is; a clear error when it is none of them."""
  path = os.fspath(path)
  if paths.isfile(paths.join(path, "config.json")):
    return "export" if hf_config.is_visor_export(path) else "transformers"
  directory, _ = checkpoints.checkpoint_dir(path)
  if paths.isdir(directory) and any(d.isdigit() for d in paths.listdir(directory)):
    return "orbax"
  raise FileNotFoundError(f"{path}: not a run. Expected an Orbax training workdir (with "
                          "checkpoints/), a transformers LLaVA-OV directory or an exported one "
                          "(with config.json).")


def describe_run(path: str, step: int | None = None, model_overrides: dict | None = None) -> Run:
  """Everything but the weights (cheap: no tensor is read)."""
  path = os.fspath(path)
  kind = kind_of(path)
  if kind != "orbax" and step is not None:
    raise ValueError(f"{path} is a {kind} directory: it has no steps (step={step}).")
  saved = None
  if kind == "orbax":
    saved = checkpoints.read_run(path, step)
    config, model, step = saved["config"], saved["model"], saved["step"]
    tokenizer = Tokenizer.from_files(saved["tokenizer"])
    system = config.get("data", {}).get("system_prompt", DEFAULT_SYSTEM_PROMPT)
  else:
    config, system = None, DEFAULT_SYSTEM_PROMPT
    model = (torch_export.exported_model_config(path) if kind == "export"
             else hf_config.read_hf_config(path))
    tokenizer = Tokenizer.from_dir(path)
  model = ml_collections.ConfigDict(model.to_dict() if hasattr(model, "to_dict") else model)
  if model_overrides:
    model.update(model_overrides)
  cfg = config_lib.model_config(model)
  if tokenizer.vocab_size > cfg.text.vocab_size:
    raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"vocabulary is {cfg.text.vocab_size}.")
  workdir = paths.dirname(checkpoints.checkpoint_dir(path)[0]) if kind == "orbax" else ""
  return Run(kind=kind, path=path, step=step, config=config, model=model, cfg=cfg,
             tokenizer=tokenizer, image_spec=_image_spec(cfg, path, kind, saved),
             system_prompt=system, workdir=workdir)


def load_run(path: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None, *,
             model_overrides: dict | None = None, rules=sharding.DEFAULT_RULES,
             shardings: Any = None) -> Run:
  """A run with its weights, placed by `shardings` (a params-shaped tree of shardings), else
  by `rules` over `mesh`, else on the first device. `model_overrides` updates the model
  ConfigDict (e.g. {'dtype': 'bfloat16'}); a change of geometry will not fit the weights."""
  run = describe_run(path, step, model_overrides)
  if shardings is None:
    shardings = param_shardings(run.cfg, mesh, rules)
  run.params = read_params(run, shardings)
  return run


def in_memory(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict,
              tokenizer: Tokenizer, params: Any, workdir: str, step: int,
              image_spec: preprocess.ImageProcessorSpec | None = None) -> Run:
  """A training run still in memory, as `load_run(workdir)` would return it after its next
  checkpoint (the trainer's end-of-run evaluation uses it: nothing is reloaded)."""
  cfg = config_lib.model_config(model)
  return Run(kind="orbax", path=workdir, step=step, config=config, model=model, cfg=cfg,
             tokenizer=tokenizer, image_spec=image_spec or inputs.processor_spec(cfg),
             system_prompt=config.data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
             params=params, workdir=workdir)


def param_shardings(cfg: config_lib.ModelConfig, mesh=None, rules=sharding.DEFAULT_RULES):
  """Params-shaped shardings: the logical-axis rules over `mesh`, or the first device."""
  abstract = nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0)))
  if mesh is not None:
    return sharding.param_shardings(abstract, mesh, rules)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def read_params(run: Run, shardings: Any, *, seed: int = 0) -> dict:
  """The run's weights, born sharded. For a transformers directory, parameters it lacks
  (VISOR's new parts) come from a random init at `seed`, then `init_visor_parts`."""
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(run.cfg), shardings)
  if run.kind == "orbax":
    try:
      return checkpoints.restore_params(run.path, abstract, run.step)
    except (ValueError, KeyError) as e:
      raise ValueError(f"{run.path} step {run.step}: the checkpoint's params do not fit the "
                       f"model saved with it (model_overrides changed its geometry?): {e}") from e
  flat_abstract = traverse_util.flatten_dict(abstract, sep=".")
  shapes = {k: v.shape for k, v in flat_abstract.items()}
  dtype = np.dtype(jax.numpy.dtype(run.cfg.param_dtype))
  if run.kind == "export":  # every parameter is in the directory
    flat = torch_export.read_exported_params(run.path, run.cfg, shapes, dtype)
  else:
    flat = hf_import.read_hf_params(run.path, run.cfg, shapes, dtype)
    missing = sorted(set(shapes) - set(flat))
    if missing:  # VISOR's new parts: a random init, gathered to every host, then the method's
      random = traverse_util.flatten_dict(random_params(
          run.cfg, seed, jax.tree.map(lambda a: a.sharding, abstract)), sep=".")
      flat.update({k: np.asarray(multihost_utils.process_allgather(random[k], tiled=True))
                   for k in missing})
    hf_import.init_visor_parts(flat, run.cfg)
  out = {k: jax.make_array_from_callback(v.shape, flat_abstract[k].sharding,
                                         lambda idx, v=v: v[idx]) for k, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep=".")


def abstract_params(cfg: config_lib.ModelConfig) -> dict:
  """Nested dict of ShapeDtypeStructs of the model's parameters (nothing allocated)."""
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0))), nnx.Param))


def random_params(cfg: config_lib.ModelConfig, seed: int, shardings: Any) -> dict:
  """A random init born sharded (`jit(init, out_shardings=...)`): no host holds the model."""
  def init(seed):
    return nnx.to_pure_dict(nnx.state(LlavaOnevision(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
  return jax.jit(init, static_argnums=0, out_shardings=shardings)(seed)


def _image_spec(cfg: config_lib.ModelConfig, path: str, kind: str, saved: dict | None
                ) -> preprocess.ImageProcessorSpec:
  """An Orbax run's saved image processor; a transformers/exported directory's
  preprocessor_config.json when it ships one; else (older checkpoints, bare directories) the
  default for the geometry, which is what the training pipeline used before runs kept theirs."""
  if saved and saved.get("image_processor"):
    return preprocess.ImageProcessorSpec.from_hf_dict(
        saved["image_processor"], source=f"{path} step {saved['step']} image_processor")
  if kind != "orbax" and any(paths.isfile(paths.join(path, f))
                             for f in ("preprocessor_config.json", "processor_config.json")):
    return preprocess.ImageProcessorSpec.from_hf_dir(path)
  return inputs.processor_spec(cfg)


# ---------------------------------------------------------------------------------------------
# A new run: its model, tokenizer and starting weights.

def check_source(field: str, path: str) -> None:
  """`path` (the config field `field`) is a run `load_run` reads; else an error naming the field,
  raised before anything is built or compiled."""
  if not paths.exists(path):
    raise FileNotFoundError(f"config.{field}={path}: no such file or directory (expected a "
                            "transformers directory, an exported one or an Orbax workdir).")
  try:
    kind_of(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.{field}={e}") from None  # e starts with the path


def check_experiment_paths(config: ml_collections.ConfigDict) -> None:
  """Every path a training config names exists (`init_from`, `tokenizer`, the data files):
  the trainer calls this first, so a typo fails in seconds, not after the data build and the
  compiles."""
  if config.init_from:
    check_source("init_from", config.init_from)
  if config.tokenizer and config.tokenizer != "synthetic" and not paths.isdir(config.tokenizer):
    raise FileNotFoundError(f"config.tokenizer={config.tokenizer}: no such directory (expected "
                            "one with tokenizer.json, or 'synthetic').")
  sources.check_paths(config.data)


def experiment_model_and_tokenizer(config: ml_collections.ConfigDict
                                   ) -> tuple[ml_collections.ConfigDict, Tokenizer]:
  """The model a training run builds and its tokenizer.

  Without `init_from`, the model is `config.model`. With it, the geometry is the source's
  (config.json, or the model saved with an Orbax run) and the experiment decides
  `EXPERIMENT_MODEL_KEYS` for a transformers source, `COMPUTE_MODEL_KEYS` otherwise. The
  tokenizer is `config.tokenizer` (a directory) if set, else the source's, else the embedded
  synthetic one.
  """
  model = ml_collections.ConfigDict(config.model.to_dict())
  source = describe_run(config.init_from) if config.init_from else None
  if source is not None:
    keys = EXPERIMENT_MODEL_KEYS if source.kind == "transformers" else COMPUTE_MODEL_KEYS
    model = ml_collections.ConfigDict(source.model.to_dict())
    for key in keys:
      model[key] = config.model[key]
  if config.tokenizer and config.tokenizer != "synthetic":
    tokenizer = Tokenizer.from_dir(config.tokenizer)
  elif source is not None:
    tokenizer = source.tokenizer
  else:
    tokenizer = build_tiny_tokenizer(sources.corpus(config.data),
                                     vocab_size=model.image_token_id)
  if tokenizer.vocab_size > model.text.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size "
                     f"is {model.text.vocab_size}.")
  return model, tokenizer


def experiment_image_spec(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig
                          ) -> preprocess.ImageProcessorSpec:
  """How a new run preprocesses its images: as its `init_from` source does (a transformers
  checkpoint's preprocessor_config.json, e.g. CLIP's mean/std, or a run's saved one), so that
  fine-tuning sees the pixels the weights were trained on and the run's checkpoints and exports
  carry them on; from scratch, the default for the geometry."""
  if config.init_from:
    return describe_run(config.init_from).image_spec
  return inputs.processor_spec(cfg)


def initial_params(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig,
                   shardings: Any) -> dict:
  """Where a run's weights start when it has no checkpoint of its own: `init_from` (any run
  `load_run` reads) or a random init at `config.seed`; born sharded either way."""
  if not config.init_from:
    return random_params(cfg, config.seed, shardings)
  source = describe_run(config.init_from)
  log.info("init_from: %s %s", source.kind, config.init_from)
  source.cfg = cfg  # the source's geometry with the experiment's settings (see above)
  return read_params(source, shardings, seed=config.seed)
