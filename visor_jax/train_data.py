"""What `train.py` needs from the outside world: tokenizer, data iterators, initial weights.

Kept apart from the trainer's linear `main()` so each source of inputs (synthetic data, LLaVA
JSON, a transformers directory, another run's checkpoint) is one small function.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from visor_jax import checkpoints, sharding
from visor_jax.config_lib import ModelConfig
from visor_jax.convert import hf_config, hf_import
from visor_jax.data import pipeline, synthetic
from visor_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer
from visor_jax.models.llava_onevision import LlavaOnevision

log = logging.getLogger(__name__)

BAD_REASONS = pipeline.BAD_REASONS


def is_hf_dir(path: str) -> bool:
  return bool(path) and os.path.exists(os.path.join(path, "config.json"))


def model_and_tokenizer(config, workdir: str) -> tuple[ml_collections.ConfigDict, Tokenizer]:
  """The model geometry (from config.json when starting from a transformers directory, with
  the experiment's VISOR and precision settings) and the matching tokenizer."""
  model = config.model
  if is_hf_dir(config.init_from):
    model = hf_config.read_hf_config(config.init_from)
    for key in ("visor", "router", "dtype", "param_dtype", "attention_impl", "remat"):
      model[key] = config.model[key]
  tok_dir = config.tokenizer if config.tokenizer != "synthetic" else (
      config.init_from if is_hf_dir(config.init_from) else "")
  if tok_dir:
    tokenizer = Tokenizer.from_dir(tok_dir)
  else:
    tokenizer = build_tiny_tokenizer(synthetic.corpus(), vocab_size=300)
    if jax.process_index() == 0:
      tokenizer.save(os.path.join(workdir, "tokenizer"))  # for generation / export later
  if tokenizer.vocab_size > model.text.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size "
                     f"is {model.text.vocab_size}.")
  return model, tokenizer


def source_for(config, split: str, workdir: str):
  """The records of one split: the synthetic dataset (built if missing) or LLaVA JSON."""
  d = config.data
  if d.source == "synthetic":
    data_dir = d.synthetic_dir or os.path.join(workdir, "synthetic_data")
    params = dict(seed=d.synthetic_seed, sizes=dict(d.synthetic_sizes),
                  min_side=d.synthetic_min_side, max_side=d.synthetic_max_side)
    synthetic.build(data_dir, **params)  # deterministic: every host may build its own copy
    return synthetic.records(split, data_dir, **params)
  if d.source == "json":
    path = d.json_path if split == "train" else d.eval_json_path
    if not path:
      return None
    return pipeline.JsonSource(path, d.image_root)
  raise ValueError(f"data.source={d.source!r} is not 'synthetic' or 'json'.")


def data_kwargs(config, cfg: ModelConfig) -> dict:
  """`config.data` as the pipeline's keyword arguments (0 = derive from the model)."""
  d = config.data.to_dict()
  d["max_visual"] = d.get("max_visual") or None
  d["max_crops"] = d.get("max_crops") or None
  return d


def train_iterator(config, cfg: ModelConfig, tokenizer: Tokenizer, workdir: str):
  source = source_for(config, "train", workdir)
  return pipeline.make_iterator(source, tokenizer, cfg, data_kwargs(config, cfg),
                                num_epochs=None, shuffle=True)


def eval_batches(config, cfg: ModelConfig, tokenizer: Tokenizer, workdir: str) -> list[dict]:
  """The first `config.eval_batches` batches of one in-order pass over the validation split."""
  source = source_for(config, "validation", workdir)
  if source is None:
    return []
  it = pipeline.make_iterator(source, tokenizer, cfg, data_kwargs(config, cfg),
                              num_epochs=1, shuffle=False, num_workers=0)
  out = []
  for batch in it:
    batch.pop("bad_counts", None)
    out.append(batch)
    if len(out) == config.eval_batches:
      break
  return out


def to_global(batch: dict, mesh) -> dict:
  """Host batch → global arrays, batch axis over (data, fsdp); host statistics dropped."""
  batch = {k: v for k, v in batch.items() if k not in pipeline.HOST_FIELDS}
  return pipeline.make_global_batch(batch, sharding.batch_sharding(mesh, 1))


def initial_params(config, cfg: ModelConfig, abstract_model: nnx.Module, param_sh: Any) -> dict:
  """Params born sharded: from a transformers directory, another run's checkpoint, or a
  random init (`jit(init, out_shardings=...)`: no host ever holds the whole model)."""
  def init(seed):
    return nnx.state(LlavaOnevision(cfg, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()

  if config.init_from and not is_hf_dir(config.init_from):  # no random init needed
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nnx.state(abstract_model, nnx.Param).to_pure_dict(), param_sh)
    log.info("init_from: Orbax checkpoint %s", config.init_from)
    return checkpoints.restore_params_from(config.init_from, abstract)
  random = jax.jit(init, static_argnums=0, out_shardings=param_sh)(config.seed)
  if not config.init_from:
    return random

  log.info("init_from: transformers directory %s", config.init_from)
  flat_random = traverse_util.flatten_dict(random, sep=".")
  shapes = {k: v.shape for k, v in flat_random.items()}
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  if hf_config.is_visor_export(config.init_from):  # every parameter is in the directory
    from visor_jax.convert import torch_export
    flat = torch_export.read_exported_params(config.init_from, cfg, shapes, dtype)
  else:
    flat = hf_import.read_hf_params(config.init_from, cfg, shapes, dtype)
    for k, v in flat_random.items():  # VISOR's new parts: random init, then the method's init
      if k not in flat:
        flat[k] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
    hf_import.init_visor_parts(flat, cfg)
  flat_sh = traverse_util.flatten_dict(param_sh, sep=".")
  out = {k: jax.make_array_from_callback(v.shape, flat_sh[k], lambda idx, v=v: v[idx])
         for k, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep=".")
