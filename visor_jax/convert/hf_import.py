"""A local transformers LLaVA-OneVision directory → visor_jax parameters.

Reads `config.json` and `model.safetensors` (or the sharded `model.safetensors.index.json`)
by memory map, never unpickling. The mapping is the table `KEY_MAP` below (MaxText style):
one row per transformers tensor, `{i}` standing for the layer index of a stacked parameter,
plus a per-row hook that converts the layout.

Checkpoint key spellings differ by transformers version; `canonical_key` folds them into one:
  hub / save_pretrained:  language_model.model.layers.0...  vision_tower.vision_model...
  transformers-5 modules: model.language_model.layers.0...  model.vision_tower...
VISOR's new parts have no transformers tensors; `init_visor_parts` sets them as the method
note decides (cross-attention copies its layer's attention and norm with a zero output; the
positional conv is zero), so the loaded model computes exactly LLaVA-OV at first.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

import numpy as np
from flax import nnx, traverse_util

from visor_jax.config_lib import ModelConfig
from visor_jax.convert.safetensors_io import SafetensorsReader

log = logging.getLogger(__name__)

Hook = Callable[[np.ndarray], np.ndarray]


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] → kernel [in, out]."""
  return w.T


def patch_conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [D, C, p, p] → kernel [p*p*C, D] over (row, col, channel) patches."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def same(w: np.ndarray) -> np.ndarray:
  return w


_V = "vision_tower.encoder.layers.{i}."
_T = "language_model.layers.{i}."
# (transformers key, our parameter path, hook). '{i}' rows fill slot i of a stacked parameter.
KEY_MAP: list[tuple[str, str, Hook]] = [
    ("vision_tower.embeddings.patch_embedding.weight", "vision.patch_embed.kernel", patch_conv),
    ("vision_tower.embeddings.patch_embedding.bias", "vision.patch_embed.bias", same),
    ("vision_tower.embeddings.position_embedding.weight", "vision.pos_embed", same),
    (_V + "layer_norm1.weight", "vision.layers.norm1.scale", same),
    (_V + "layer_norm1.bias", "vision.layers.norm1.bias", same),
    (_V + "self_attn.q_proj.weight", "vision.layers.q_proj.kernel", linear),
    (_V + "self_attn.q_proj.bias", "vision.layers.q_proj.bias", same),
    (_V + "self_attn.k_proj.weight", "vision.layers.k_proj.kernel", linear),
    (_V + "self_attn.k_proj.bias", "vision.layers.k_proj.bias", same),
    (_V + "self_attn.v_proj.weight", "vision.layers.v_proj.kernel", linear),
    (_V + "self_attn.v_proj.bias", "vision.layers.v_proj.bias", same),
    (_V + "self_attn.out_proj.weight", "vision.layers.o_proj.kernel", linear),
    (_V + "self_attn.out_proj.bias", "vision.layers.o_proj.bias", same),
    (_V + "layer_norm2.weight", "vision.layers.norm2.scale", same),
    (_V + "layer_norm2.bias", "vision.layers.norm2.bias", same),
    (_V + "mlp.fc1.weight", "vision.layers.fc1.kernel", linear),
    (_V + "mlp.fc1.bias", "vision.layers.fc1.bias", same),
    (_V + "mlp.fc2.weight", "vision.layers.fc2.kernel", linear),
    (_V + "mlp.fc2.bias", "vision.layers.fc2.bias", same),
    ("vision_tower.post_layernorm.weight", "vision.post_norm.scale", same),
    ("vision_tower.post_layernorm.bias", "vision.post_norm.bias", same),
    ("multi_modal_projector.linear_1.weight", "projector_1.kernel", linear),
    ("multi_modal_projector.linear_1.bias", "projector_1.bias", same),
    ("multi_modal_projector.linear_2.weight", "projector_2.kernel", linear),
    ("multi_modal_projector.linear_2.bias", "projector_2.bias", same),
    ("image_newline", "image_newline", same),
    ("language_model.embed_tokens.weight", "embed", same),
    (_T + "input_layernorm.weight", "decoder.layers.input_norm.scale", same),
    (_T + "self_attn.q_proj.weight", "decoder.layers.attn.q_proj.kernel", linear),
    (_T + "self_attn.q_proj.bias", "decoder.layers.attn.q_proj.bias", same),
    (_T + "self_attn.k_proj.weight", "decoder.layers.attn.k_proj.kernel", linear),
    (_T + "self_attn.k_proj.bias", "decoder.layers.attn.k_proj.bias", same),
    (_T + "self_attn.v_proj.weight", "decoder.layers.attn.v_proj.kernel", linear),
    (_T + "self_attn.v_proj.bias", "decoder.layers.attn.v_proj.bias", same),
    (_T + "self_attn.o_proj.weight", "decoder.layers.attn.o_proj.kernel", linear),
    (_T + "post_attention_layernorm.weight", "decoder.layers.post_attn_norm.scale", same),
    (_T + "mlp.gate_proj.weight", "decoder.layers.mlp.gate_proj.kernel", linear),
    (_T + "mlp.up_proj.weight", "decoder.layers.mlp.up_proj.kernel", linear),
    (_T + "mlp.down_proj.weight", "decoder.layers.mlp.down_proj.kernel", linear),
    ("language_model.norm.weight", "decoder.norm.scale", same),
    ("lm_head.weight", "lm_head.kernel", linear),
]

# Spellings of the same tensor across transformers versions → the canonical key above.
_REWRITES = [
    (re.compile(r"^model\.(?=(language_model|vision_tower|multi_modal_projector|image_newline))"), ""),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
]
# Present in some checkpoints, unused by LLaVA-OV (the SigLIP pooling head).
_IGNORED = re.compile(r"^vision_tower\.head\.")


def canonical_key(key: str) -> str:
  for pattern, repl in _REWRITES:
    key = pattern.sub(repl, key)
  return key


def flat_params(model: nnx.Module) -> dict[str, object]:
  """{'decoder.layers.attn.q_proj.kernel': array, ...} of the model's parameters."""
  return {".".join(map(str, path)): v[...] if hasattr(v, "__getitem__") else v
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def set_params(model: nnx.Module, flat: dict[str, object]) -> None:
  """Writes a flat {path: array} dict (all parameters) into the model."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat, sep="."))
  nnx.update(model, state)


def read_hf_params(directory: str, cfg: ModelConfig,
                   shapes: dict[str, tuple[int, ...]], dtype) -> dict[str, np.ndarray]:
  """Every LLaVA-OV parameter of the checkpoint, in our layout and `dtype`.

  `shapes` holds our expected shape per parameter path (from `nnx.eval_shape` of the model);
  a missing tensor or a shape mismatch raises `ValueError` naming the tensor.
  """
  reader = SafetensorsReader(directory)
  by_key = {canonical_key(k): k for k in reader.keys()}
  layers = {"vision_tower": cfg.vision.num_layers, "language_model": cfg.text.num_layers}
  out: dict[str, np.ndarray] = {}
  used = set()
  for hf_key, path, hook in KEY_MAP:
    if path == "lm_head.kernel" and cfg.text.tie_word_embeddings:
      if "lm_head.weight" in by_key:
        used.add("lm_head.weight")
      continue
    if path not in shapes:
      raise ValueError(f"{path}: not a parameter of this model (key map out of date).")
    n = layers[hf_key.split(".")[0]] if "{i}" in hf_key else None
    keys = [hf_key.format(i=i) for i in range(n)] if n is not None else [hf_key]
    parts = []
    expected = tuple(shapes[path])[1:] if n is not None else tuple(shapes[path])
    for key in keys:
      if key not in by_key:
        raise ValueError(f"{directory}: tensor {key!r} is missing from the checkpoint.")
      used.add(key)
      part = np.asarray(hook(reader.get(by_key[key])), dtype=dtype)
      if part.shape != expected:
        raise ValueError(f"{key}: shape {part.shape} in our layout does not match the model's "
                         f"{expected} (config.json and weights disagree?).")
      parts.append(part)
    value = np.stack(parts) if n is not None else parts[0]
    out[path] = value
  unused = sorted(k for k in by_key if k not in used and not _IGNORED.match(k))
  if unused:
    log.warning("%d checkpoint tensors not used: %s", len(unused), unused[:10])
  return out


def init_visor_parts(params: dict[str, np.ndarray], cfg: ModelConfig) -> None:
  """Sets VISOR's new parameters in place from the loaded LLaVA-OV ones (method note).

  Cross-attention on layer l starts as a copy of layer l's input norm and q/k/v projections
  (a pretrained reader of visual tokens), with output projection zero ('zero_out') or its
  tanh gate zero ('tanh'): an exact no-op until trained. The positional conv's pointwise
  projection stays zero. `ca_init='random'` keeps the random init except the zero output.
  """
  z = cfg.visor
  if not z.ca_layers or z.ca_init != "copy_self_attn":
    return
  idx = list(z.ca_layers)
  for name in ("q_proj", "k_proj", "v_proj"):
    for leaf in ("kernel", "bias"):
      params[f"decoder.cross.attn.{name}.{leaf}"] = params[
          f"decoder.layers.attn.{name}.{leaf}"][idx].copy()
  norm = params["decoder.layers.input_norm.scale"][idx]
  params["decoder.cross.q_norm.scale"] = norm.copy()
  params["decoder.cross.kv_norm.scale"] = norm.copy()
  if z.ca_gate == "zero_out":
    params["decoder.cross.attn.o_proj.kernel"] = np.zeros_like(
        params["decoder.cross.attn.o_proj.kernel"])
  else:  # tanh gate at zero; the projection may start from the host layer's
    params["decoder.cross.attn.o_proj.kernel"] = params["decoder.layers.attn.o_proj.kernel"][idx].copy()


def load_hf_model(directory: str, model_overrides: dict | None = None, *, seed: int = 0):
  """A transformers LLaVA-OV directory → (LlavaOnevision with VISOR parts, ModelConfig).

  `model_overrides` updates the `config.model` read from config.json (e.g. `visor`,
  `dtype`); VISOR's new parts are initialised by `init_visor_parts`.
  """
  import jax
  from visor_jax import config_lib
  from visor_jax.convert.hf_config import read_hf_config
  from visor_jax.models.llava_onevision import LlavaOnevision

  m = read_hf_config(directory)
  if model_overrides:
    m.update(model_overrides)
  cfg = config_lib.model_config(m)
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(seed))
  flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
  loaded = read_hf_params(directory, cfg, {k: v.shape for k, v in flat.items()},
                          jax.numpy.dtype(cfg.param_dtype))
  flat.update(loaded)
  init_visor_parts(flat, cfg)
  set_params(model, jax.tree.map(jax.numpy.asarray, flat))
  return model, cfg
