"""visor_jax parameters ↔ a transformers-style directory that PyTorch loads.

An exported directory is a transformers LLaVA-OneVision directory (`config.json`,
`model.safetensors` or shards + `model.safetensors.index.json`, tokenizer files,
`preprocessor_config.json`) plus, when the model has them, VISOR's new tensors under `visor.*`
and a `"visor"` key in config.json describing the layout. transformers'
`LlavaOnevisionForConditionalGeneration.from_pretrained` loads the LLaVA-OV part as is (it
reports the `visor.*` tensors as unexpected and ignores them); `torch_model.py` loads both.

Tensor names (torch layouts: Linear [out, in], Conv1d [out, in/groups, k]):
  LLaVA-OV   exactly what `save_pretrained` writes in transformers 5.x: `hf_import.KEY_MAP`'s
             canonical keys with `language_model.` → `language_model.model.` and `lm_head.` →
             `language_model.lm_head.` (tested against a real `save_pretrained` directory);
             `lm_head` is left out when embeddings are tied, as `save_pretrained` does.
  VISOR      `VISOR_MAP` below; `{l}` is the LLM layer index of a cross-attention module (not
             its slot), so a name says where the module sits without reading the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from visor_jax import config_lib, paths
from visor_jax.config_lib import ModelConfig
from visor_jax.convert import safetensors_io

Hook = Callable[[np.ndarray], np.ndarray]
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")


def same(w: np.ndarray) -> np.ndarray:
  return w


def linear(w: np.ndarray) -> np.ndarray:
  """kernel [in, out] ↔ torch Linear weight [out, in] (its own inverse)."""
  return w.T


def depthwise_to_torch(w: np.ndarray) -> np.ndarray:
  """Our depthwise taps [k, D] → torch Conv1d(groups=D) weight [D, 1, k]."""
  return w.T[:, None, :]


def depthwise_from_torch(w: np.ndarray) -> np.ndarray:
  return w[:, 0, :].T


def pointwise_to_torch(w: np.ndarray) -> np.ndarray:
  """Our pointwise [D_in, D_out] (v @ w) → torch Conv1d weight [D_out, D_in, 1]."""
  return w.T[:, :, None]


def pointwise_from_torch(w: np.ndarray) -> np.ndarray:
  return w[:, :, 0].T


# (our parameter path, exported name, ours → torch, torch → ours). '{l}' rows are stacked over
# the cross-attention slots; slot j is LLM layer cfg.visor.ca_layers[j].
_CA = "visor.cross_attn.{l}."
VISOR_MAP: list[tuple[str, str, Hook, Hook]] = [
    ("decoder.cross.q_norm.scale", _CA + "q_norm.weight", same, same),
    ("decoder.cross.kv_norm.scale", _CA + "kv_norm.weight", same, same),
    ("decoder.cross.attn.q_proj.kernel", _CA + "q_proj.weight", linear, linear),
    ("decoder.cross.attn.q_proj.bias", _CA + "q_proj.bias", same, same),
    ("decoder.cross.attn.k_proj.kernel", _CA + "k_proj.weight", linear, linear),
    ("decoder.cross.attn.k_proj.bias", _CA + "k_proj.bias", same, same),
    ("decoder.cross.attn.v_proj.kernel", _CA + "v_proj.weight", linear, linear),
    ("decoder.cross.attn.v_proj.bias", _CA + "v_proj.bias", same, same),
    ("decoder.cross.attn.o_proj.kernel", _CA + "o_proj.weight", linear, linear),
    ("decoder.cross.gate", _CA + "gate", same, same),  # scalar; only with ca_gate='tanh'
    ("decoder.pos_conv.depthwise", "visor.pos_conv.depthwise.weight", depthwise_to_torch,
     depthwise_from_torch),
    ("decoder.pos_conv.depthwise_bias", "visor.pos_conv.depthwise.bias", same, same),
    ("decoder.pos_conv.pointwise", "visor.pos_conv.pointwise.weight", pointwise_to_torch,
     pointwise_from_torch),
    ("decoder.pos_conv.pointwise_bias", "visor.pos_conv.pointwise.bias", same, same),
    ("decoder.router.norm.scale", "visor.router.norm.weight", same, same),
    ("decoder.router.fc1.kernel", "visor.router.fc1.weight", linear, linear),
    ("decoder.router.fc1.bias", "visor.router.fc1.bias", same, same),
    ("decoder.router.fc2.kernel", "visor.router.fc2.weight", linear, linear),
    ("decoder.router.fc2.bias", "visor.router.fc2.bias", same, same),
]
# Parameters no forward uses, left out of every export: the hop loss's head (training only).
TRAINING_ONLY = ("decoder.hop_head",)


def saved_name(canonical: str) -> str:
  """hf_import's canonical key → the name transformers 5.x `save_pretrained` writes."""
  if canonical.startswith("language_model."):
    return "language_model.model." + canonical[len("language_model."):]
  if canonical.startswith("lm_head."):
    return "language_model." + canonical
  return canonical


def _patch_conv_to_torch(cfg: ModelConfig) -> Hook:
  """kernel [p*p*C, D] over (row, col, channel) patches → Conv2d weight [D, C, p, p]."""
  p, c = cfg.vision.patch_size, cfg.vision.num_channels
  return lambda w: w.reshape(p, p, c, w.shape[-1]).transpose(3, 2, 0, 1)


def _llava_rows(cfg: ModelConfig) -> list[tuple[str, str, Hook]]:
  """(exported name with '{i}', our path, ours → torch) for every LLaVA-OV tensor."""
  from visor_jax.convert import hf_import  # imports flax: keep this module's import light
  inverse = {hf_import.linear: linear, hf_import.same: same,
             hf_import.patch_conv: _patch_conv_to_torch(cfg)}
  rows = []
  for hf_key, path, hook in hf_import.KEY_MAP:
    if path == "lm_head.kernel" and cfg.text.tie_word_embeddings:
      continue  # tied: save_pretrained writes only the embedding
    rows.append((saved_name(hf_key), path, inverse[hook]))
  return rows


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  """One exported tensor, made on demand (so only one is on the host at a time)."""
  name: str
  shape: tuple[int, ...]
  make: Callable[[], np.ndarray]


def plan_tensors(flat: Mapping[str, Any], cfg: ModelConfig, dtype) -> list[TensorPlan]:
  """Every tensor of the export, in KEY_MAP then VISOR_MAP order, without materialising any.

  `flat` maps our dotted parameter paths to arrays (numpy or jax, possibly on device); a stacked
  parameter [L, ...] becomes L tensors, each gathered to the host only when written.
  """
  dtype = np.dtype(dtype)
  layers = {"vision_tower": cfg.vision.num_layers, "language_model": cfg.text.num_layers}
  slots = list(cfg.visor.ca_layers)
  out: list[TensorPlan] = []

  def add(name, value, index, hook):
    shape = value.shape[1:] if index is not None else value.shape
    dummy = np.broadcast_to(np.zeros((), np.float32), shape)  # shape only, no memory
    def make(value=value, index=index, hook=hook):
      part = value[index] if index is not None else value
      return np.ascontiguousarray(hook(np.asarray(part)).astype(dtype))
    out.append(TensorPlan(name, tuple(hook(dummy).shape), make))

  for name, path, hook in _llava_rows(cfg):
    _require_path(flat, path)
    if "{i}" in name:
      for i in range(layers[name.split(".")[0]]):
        add(name.format(i=i), flat[path], i, hook)
    else:
      add(name, flat[path], None, hook)
  for path, name, hook, _ in VISOR_MAP:
    if path not in flat:
      continue  # a part this model does not have (no CA, no tanh gate, no conv, no router)
    if "{l}" in name:
      for j, layer in enumerate(slots):
        add(name.format(l=layer), flat[path], j, hook)
    else:
      add(name, flat[path], None, hook)
  known = {row[1] for row in _llava_rows(cfg)} | {row[0] for row in VISOR_MAP} | set(TRAINING_ONLY)
  if cfg.text.tie_word_embeddings:
    known.add("lm_head.kernel")
  unknown = sorted(set(flat) - known)
  if unknown:
    raise ValueError(f"parameters with no exported name (key maps out of date?): {unknown}")
  return out


def _require_path(flat: Mapping[str, Any], path: str) -> None:
  if path not in flat:
    raise ValueError(f"{path}: missing from the parameters being exported.")


def parse_size(size: str | int) -> int:
  """'5GB', '500MB', '100KB' or a byte count → bytes (decimal units, like transformers)."""
  if isinstance(size, int):
    return size
  s = size.strip().upper()
  for unit, factor in (("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 10**9),
                       ("MB", 10**6), ("KB", 10**3), ("B", 1)):
    if s.endswith(unit):
      return int(float(s[:-len(unit)]) * factor)
  return int(s)


def write_safetensors(plans: list[TensorPlan], out_dir: str, dtype, max_shard_bytes: int
                      ) -> list[str]:
  """One `model.safetensors`, or shards + index past `max_shard_bytes`; returns file names.

  Shards are planned from shapes alone (`iter_shards` over zero-cost broadcast views), then
  each shard is materialised, written and dropped: host memory peaks at one shard.
  """
  itemsize = np.dtype(dtype).itemsize
  sized = {p.name: np.broadcast_to(np.zeros((), np.uint8), (math.prod(p.shape) * itemsize,))
           for p in plans}
  groups = [list(g) for g in safetensors_io.iter_shards(sized, max_shard_bytes)]
  by_name = {p.name: p for p in plans}
  meta = {"format": "pt"}
  if len(groups) <= 1:
    names = [safetensors_io.SINGLE_FILE]
  else:
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  weight_map = {}
  for file_name, group in zip(names, groups or [[]]):
    tensors = {key: by_name[key].make() for key in group}
    safetensors_io.save_file(tensors, paths.join(out_dir, file_name), metadata=meta)
    weight_map.update({key: file_name for key in group})
    del tensors
  if len(names) > 1:
    total = sum(math.prod(p.shape) * itemsize for p in plans)
    with paths.open(paths.join(out_dir, safetensors_io.INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def visor_layout(cfg: ModelConfig) -> dict[str, Any]:
  """The `"visor"` entry of config.json: everything needed to rebuild VISOR's forward."""
  z, r = cfg.visor, cfg.router
  out = dict(ca_layers=list(z.ca_layers), sa_candidates=list(z.sa_candidates),
             ca_gate=z.ca_gate, ca_init=z.ca_init, pos_conv=z.pos_conv,
             pos_conv_kernel=z.pos_conv_kernel)
  if r.enabled:
    out["router"] = dict(feasible=[list(b) for b in r.feasible], hidden=r.hidden,
                         threshold=r.threshold)
  return out


def has_visor_parts(cfg: ModelConfig) -> bool:
  """False for the all-SA baseline: then the export is a plain LLaVA-OV directory."""
  return bool(cfg.visor.ca_layers) or cfg.visor.pos_conv or cfg.router.enabled


def hf_config_dict(cfg: ModelConfig, dtype) -> dict[str, Any]:
  """transformers' LlavaOnevisionConfig as JSON, plus our `visor` layout.

  transformers keeps unknown config keys as attributes, so the `visor` key is harmless to a
  plain `from_pretrained` (tested); it is written for plain models too, so that
  `load_exported` knows there are no VISOR parts to look for.
  """
  from visor_jax.convert import hf_config
  out = hf_config.to_hf_dict(ml_collections.ConfigDict(dataclasses.asdict(cfg)))
  out["dtype"] = np.dtype(dtype).name  # 'float32' | 'bfloat16': what from_pretrained defaults to
  out["visor"] = visor_layout(cfg)
  return out


def preprocessor_dict(cfg: ModelConfig, image_spec=None) -> dict[str, Any]:
  """preprocessor_config.json: `image_spec` (a `preprocess.ImageProcessorSpec`: how the run's
  images were preprocessed), else the default for the geometry (`inputs.processor_spec`)."""
  if image_spec is None:
    from visor_jax.data import inputs
    image_spec = inputs.processor_spec(cfg)
  return image_spec.to_hf_dict()


def copy_tokenizer(tokenizer_dir: str, out_dir: str) -> list[str]:
  """Copies a tokenizer directory's files (`tokenizer.TOKENIZER_FILES`); returns their names."""
  from visor_jax.data.tokenizer import Tokenizer
  return Tokenizer.from_dir(tokenizer_dir).save(out_dir)


def _model_config(model: ModelConfig | ml_collections.ConfigDict | dict) -> ModelConfig:
  return model if isinstance(model, ModelConfig) else config_lib.model_config(model)


def export_params(params: Mapping[str, Any], model, out_dir: str, dtype="float32", *,
                  tokenizer_dir: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  preprocessor: bool = True, image_spec=None) -> list[str]:
  """Writes an exported directory; returns the safetensors file names written.

  params: flat {dotted path: array} or the nested params dict (numpy or jax arrays; each is
  gathered to the host one tensor at a time). model: `ModelConfig` or a `config.model`
  ConfigDict. dtype: 'float32' or 'bfloat16' (the stored tensor dtype). image_spec: the
  run's `ImageProcessorSpec` (`Run.image_spec`), written as preprocessor_config.json so that
  the export preprocesses as its source did (None: the default for the geometry).
  """
  import ml_dtypes
  cfg = _model_config(model)
  dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(str(dtype), dtype)
  flat = _flatten(params)
  paths.makedirs(out_dir)
  _remove_old_weights(out_dir)
  plans = plan_tensors(flat, cfg, dtype)
  files = write_safetensors(plans, out_dir, dtype, max_shard_bytes)
  _write_json(paths.join(out_dir, "config.json"), hf_config_dict(cfg, dtype))
  if preprocessor:
    _write_json(paths.join(out_dir, "preprocessor_config.json"),
                preprocessor_dict(cfg, image_spec))
  if tokenizer_dir:
    copy_tokenizer(tokenizer_dir, out_dir)
  return files


def _remove_old_weights(out_dir: str) -> None:
  """A previous export's single file or shards would shadow or mix with the new ones."""
  for name in paths.listdir(out_dir):
    if name == safetensors_io.INDEX_FILE or (name.startswith("model")
                                             and name.endswith(".safetensors")):
      paths.remove(paths.join(out_dir, name))


def _flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  if all(not isinstance(v, Mapping) for v in params.values()):
    return dict(params)
  out = {}
  def walk(prefix, tree):
    for k, v in tree.items():
      key = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        walk(key, v)
      else:
        out[key] = v
  walk("", params)
  return out


def _write_json(path: str, data: dict) -> None:
  with paths.open(path, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")


# ----------------------------------------------------------------------------------- import back

def exported_model_config(directory: str) -> ml_collections.ConfigDict:
  """config.json of an exported directory → `config.model` with its VISOR layout and router.

  A directory without a `visor` key (e.g. a plain transformers one) is read as the all-SA
  baseline: no cross-attention, no positional conv, no router.
  """
  from visor_jax.convert import hf_config
  path = paths.join(directory, "config.json")
  if not paths.exists(path):
    raise FileNotFoundError(f"{directory}: no config.json (not an exported directory).")
  hf = json.loads(paths.read_text(path))
  layout = dict(hf.pop("visor", None) or dict(ca_layers=[], sa_candidates=[], pos_conv=False))
  router = layout.pop("router", None)
  m = hf_config.from_hf_dict(hf)
  m.visor.update(layout)
  m.router = ml_collections.ConfigDict(dict(feasible=None, hidden=256, threshold=0.5))
  if router:
    m.router.update(router)
  return m


def check_tensors(directory: str, cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]
                  ) -> None:
  """Every tensor the model needs is in the directory with the right shape, else a
  `ValueError` naming it (any transformers key spelling is accepted for LLaVA-OV tensors)."""
  from visor_jax.convert.hf_import import canonical_key
  reader = safetensors_io.SafetensorsReader(directory)
  by_key = {canonical_key(k): k for k in reader.keys()}
  dummies = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}
  for plan in plan_tensors(dummies, cfg, np.float32):
    key = by_key.get(canonical_key(plan.name))
    if key is None:
      raise ValueError(f"{directory}: tensor {plan.name!r} is missing from the export.")
    if reader.shape(key) != plan.shape:
      raise ValueError(f"{directory}: tensor {key!r} has shape {reader.shape(key)}, the model "
                       f"expects {plan.shape} (config.json and weights disagree?).")


def _read_visor_params(directory: str, cfg: ModelConfig, paths, dtype) -> dict[str, np.ndarray]:
  """VISOR's parameters (those in `paths`) from the `visor.*` tensors, in our layout."""
  reader = safetensors_io.SafetensorsReader(directory)
  out = {}
  for path, name, _, from_torch in VISOR_MAP:
    if path not in paths:
      continue
    stacked = "{l}" in name
    names = [name.format(l=l) for l in cfg.visor.ca_layers] if stacked else [name]
    parts = [np.asarray(from_torch(np.asarray(reader.get(key))), dtype=dtype) for key in names]
    out[path] = np.stack(parts) if stacked else parts[0]
  return out


@contextlib.contextmanager
def _quiet_unused_warning():
  """read_hf_params warns about tensors it does not use; here those are the visor.* ones."""
  logger = logging.getLogger("visor_jax.convert.hf_import")
  drop = lambda record: "not used" not in record.getMessage()  # noqa: E731
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def read_exported_params(directory: str, cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                         dtype) -> dict[str, np.ndarray]:
  """Every parameter of an exported directory, {our path: array in `dtype`}, LLaVA-OV and VISOR.

  `shapes`: our expected shape per parameter path (e.g. from `nnx.eval_shape`). Nothing is left
  to an init: a missing tensor or a shape mismatch raises `ValueError` naming the tensor. (For a
  trainer's `init_from` or a server: `hf_import.read_hf_params` alone would ignore `visor.*`.)
  """
  from visor_jax.convert import hf_import
  check_tensors(directory, cfg, shapes)
  with _quiet_unused_warning():
    flat = hf_import.read_hf_params(directory, cfg, shapes, dtype)
  flat.update(_read_visor_params(directory, cfg, shapes, dtype))
  missing = sorted(set(shapes) - set(flat))
  if missing:
    raise ValueError(f"{directory}: no tensor in the export for parameters {missing}.")
  return flat


def load_exported(directory: str, model_overrides: dict | None = None):
  """An exported directory → (LlavaOnevision, ModelConfig), parameters exactly as stored.

  The LLaVA-OV part goes through `hf_import.read_hf_params` (so it accepts any spelling
  transformers writes); VISOR's parts come from `visor.*` with the inverse of `VISOR_MAP`.
  Every parameter must come from the directory: nothing is left at a random init.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from visor_jax.convert import hf_import
  from visor_jax.models.llava_onevision import LlavaOnevision

  m = exported_model_config(directory)
  if model_overrides:
    m.update(model_overrides)
  cfg = config_lib.model_config(m)
  abstract = nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0)))
  shapes = {".".join(map(str, path)): tuple(v.get_raw_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  flat = read_exported_params(directory, cfg, shapes, np.dtype(jnp.dtype(cfg.param_dtype)))
  hf_import.set_params(abstract, jax.tree.map(jnp.asarray, flat))
  return abstract, cfg

