"""Typed, validated model configuration.

Experiment configs are `ml_collections.ConfigDict`s (easy to override from the command line);
the model itself takes the frozen dataclasses below. `model_config()` is the one place where a
ConfigDict becomes a `ModelConfig`, and every check raises `ValueError` naming the offending
field *before* anything is traced or compiled.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import ml_collections

CA_GATES = ("zero_out", "tanh")
CA_INITS = ("copy_self_attn", "random")
DTYPES = ("float32", "bfloat16", "float16")
# model.attention_impl (None = the backend's default, `nn.default_implementation`: 'blockwise'
# on CPU, 'xla' elsewhere): see `visor_jax.models.nn.attention`.
ATTENTION_IMPLS = ("xla", "cudnn", "blockwise", "splash")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """SigLIP vision tower geometry."""
  image_size: int = 384          # side of one crop, pixels
  patch_size: int = 14
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 26
  num_heads: int = 16
  layer_norm_eps: float = 1e-6
  num_channels: int = 3

  @property
  def grid(self) -> int:
    """Patches per crop side (27 for 384/14)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Qwen2 decoder geometry."""
  vocab_size: int = 152000
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int = 64
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  tie_word_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class VisorConfig:
  """Which LLM layers get VISOR's new parts, and how those parts start.

  `ca_layers`: layers with a cross-attention module (text reads vision).
  `sa_candidates`: layers a budget may switch to full self-attention over [vision; text].
  A budget is a boolean per LLM layer; bits outside `sa_candidates` are allowed (the all-SA
  budget *is* LLaVA-OV) but feasible budgets and the router only use candidates.
  """
  ca_layers: tuple[int, ...] = ()
  sa_candidates: tuple[int, ...] = ()
  ca_gate: str = "zero_out"      # 'zero_out': o_proj starts at 0; 'tanh': tanh(gate) with gate=0
  ca_init: str = "copy_self_attn"  # q/k/v/norm copied from the host layer's self-attention
  pos_conv: bool = True          # depthwise-separable 1D conv over visual tokens, residual
  pos_conv_kernel: int = 7
  # A training-only head for the hop loss (training/hop_loss.py): never in the forward, never
  # exported. Set by the run that creates the model; later runs inherit it with the weights.
  hop_head: bool = False


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """The per-sample budget policy (method note, "The router").

  `feasible`: the K budgets it chooses from (SA layer sets, cheapest first), e.g. the frontier
  written by the feasible-budget search. Empty = no router (budgets are always given).
  It reads the hidden state of the last prompt token entering the first SA candidate layer.
  """
  feasible: tuple[tuple[int, ...], ...] = ()
  hidden: int = 256
  threshold: float = 0.5   # default cost knob: cheapest budget with P(sufficient) >= threshold

  @property
  def enabled(self) -> bool:
    return bool(self.feasible)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig
  text: TextConfig
  visor: VisorConfig
  router: RouterConfig = RouterConfig()
  feature_layer: int | tuple[int, ...] = -1
  projector_bias: bool = True
  image_token_id: int = 151646
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
  vision_aspect_ratio: str = "anyres_max_9"
  dtype: str = "float32"          # compute dtype (activations, matmuls)
  param_dtype: str = "float32"    # storage dtype of parameters
  # None: 'blockwise' on CPU, 'xla' elsewhere; 'xla': jax.nn.dot_product_attention's XLA
  # path; 'cudnn': its fused GPU kernel (bf16/fp16) for self-attention, blockwise for the rest
  # (models/cudnn_attention.py);
  # 'blockwise': flash-style plain JAX, no [T, T] array (models/blockwise_attention.py);
  # 'splash': the Pallas TPU kernel for self-attention, blockwise for the rest
  # (models/splash_attention.py; interpret mode off TPU).
  attention_impl: str | None = None
  remat: bool = False             # rematerialise each LLM and SigLIP layer in the backward pass

  @property
  def num_layers(self) -> int:
    return self.text.num_layers

  @property
  def feature_layers(self) -> tuple[int, ...]:
    fl = self.feature_layer
    return (fl,) if isinstance(fl, int) else tuple(fl)

  @property
  def max_num_crops_per_image(self) -> int:
    return 1 + max(h * w for h, w in (
        (ph // self.vision.image_size, pw // self.vision.image_size)
        for ph, pw in self.image_grid_pinpoints))


def uniform_layers(num_layers: int, every: int, offset: int) -> tuple[int, ...]:
  """Layers offset, offset+every, ... below num_layers: the paper's 'spread uniformly'."""
  return tuple(range(offset, num_layers, every)) if every > 0 else ()


def _check_layers(name: str, layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
  layers = tuple(int(i) for i in layers)
  for i in layers:
    if not 0 <= i < num_layers:
      raise ValueError(f"{name}: layer index {i} is out of range [0, {num_layers}).")
  if len(set(layers)) != len(layers):
    raise ValueError(f"{name}: duplicate layer indices in {layers}.")
  return tuple(sorted(layers))


def _positive(name: str, value: Any) -> int:
  if not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def model_config(m: ml_collections.ConfigDict | dict) -> ModelConfig:
  """Validates a `config.model` ConfigDict and returns the frozen `ModelConfig`."""
  m = ml_collections.ConfigDict(m) if isinstance(m, dict) else m
  v, t, z = m.vision, m.text, m.visor
  for key in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
              "num_heads"):
    _positive(f"model.vision.{key}", v[key])
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads"):
    _positive(f"model.text.{key}", t[key])
  if v.image_size < v.patch_size:
    raise ValueError(f"model.vision.image_size={v.image_size} is smaller than "
                     f"model.vision.patch_size={v.patch_size}.")
  if v.hidden_size % v.num_heads:
    raise ValueError("model.vision.hidden_size must be divisible by model.vision.num_heads.")
  if t.num_heads % t.num_kv_heads:
    raise ValueError(f"model.text.num_heads={t.num_heads} must be a multiple of "
                     f"model.text.num_kv_heads={t.num_kv_heads}.")
  head_dim = t.get("head_dim") or t.hidden_size // t.num_heads
  vision = VisionConfig(
      image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
      intermediate_size=v.intermediate_size, num_layers=v.num_layers, num_heads=v.num_heads,
      layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)))
  text = TextConfig(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
      head_dim=head_dim, rms_norm_eps=float(t.rms_norm_eps), rope_theta=float(t.rope_theta),
      tie_word_embeddings=bool(t.tie_word_embeddings))

  n = text.num_layers
  ca = z.get("ca_layers")
  if ca is None:
    ca = uniform_layers(n, z.get("ca_every", 3), z.get("ca_offset", 0))
  sa = z.get("sa_candidates")
  if sa is None:
    sa = uniform_layers(n, z.get("sa_every", 3), z.get("sa_offset", 1))
  if z.ca_gate not in CA_GATES:
    raise ValueError(f"model.visor.ca_gate={z.ca_gate!r} is not one of {CA_GATES}.")
  if z.ca_init not in CA_INITS:
    raise ValueError(f"model.visor.ca_init={z.ca_init!r} is not one of {CA_INITS}.")
  kernel = z.get("pos_conv_kernel", 7)
  if _positive("model.visor.pos_conv_kernel", kernel) % 2 == 0:
    raise ValueError(f"model.visor.pos_conv_kernel={kernel} must be odd (same-length conv).")
  visor = VisorConfig(
      ca_layers=_check_layers("model.visor.ca_layers", ca, n),
      sa_candidates=_check_layers("model.visor.sa_candidates", sa, n),
      ca_gate=z.ca_gate, ca_init=z.ca_init, pos_conv=bool(z.get("pos_conv", True)),
      pos_conv_kernel=kernel, hop_head=bool(z.get("hop_head", False)))

  # The vision feature layer indexes hidden_states = [embeddings, layer_1, ..., layer_N].
  fl = m.feature_layer
  fl = int(fl) if isinstance(fl, int) else tuple(int(i) for i in fl)
  for i in (fl,) if isinstance(fl, int) else fl:
    if not -(vision.num_layers + 1) <= i <= vision.num_layers:
      raise ValueError(f"model.feature_layer: {i} is out of range for "
                       f"{vision.num_layers} vision layers.")
  if m.get("feature_select_strategy", "full") != "full":
    raise ValueError("model.feature_select_strategy: only 'full' is supported (SigLIP has no "
                     "CLS token to drop).")
  pinpoints = tuple(tuple(int(x) for x in p) for p in m.image_grid_pinpoints)
  for p in pinpoints:
    if len(p) != 2 or p[0] % vision.image_size or p[1] % vision.image_size:
      raise ValueError(f"model.image_grid_pinpoints: {p} is not a (height, width) multiple of "
                       f"the crop size {vision.image_size}.")
  if not pinpoints:
    raise ValueError("model.image_grid_pinpoints is empty.")
  if not re.fullmatch(r"anyres_max_\d+", m.vision_aspect_ratio):
    raise ValueError(f"model.vision_aspect_ratio={m.vision_aspect_ratio!r}: expected "
                     "'anyres_max_N'.")
  for key in ("dtype", "param_dtype"):
    if m[key] not in DTYPES:
      raise ValueError(f"model.{key}={m[key]!r} is not one of {DTYPES}.")
  attention_impl = m.get("attention_impl")
  if attention_impl is not None and attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={attention_impl!r} is not one of "
                     f"{ATTENTION_IMPLS} or None.")
  if attention_impl == "cudnn" and m.dtype == "float32":
    raise ValueError("model.attention_impl='cudnn': cuDNN's kernel computes in bfloat16 or "
                     "float16; set model.dtype='bfloat16' (or pick 'xla' / 'blockwise').")
  r = m.get("router") or {}
  feasible = tuple(sorted((tuple(sorted(int(i) for i in b)) for b in (r.get("feasible") or ())),
                         key=len))  # cheapest (fewest SA layers) first
  for b in feasible:
    for i in b:
      if i not in visor.sa_candidates:
        raise ValueError(f"model.router.feasible: layer {i} of budget {list(b)} is not an SA "
                         f"candidate {list(visor.sa_candidates)}.")
  if len(set(feasible)) != len(feasible):
    raise ValueError("model.router.feasible: duplicate budgets.")
  threshold = float(r.get("threshold", 0.5))
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"model.router.threshold={threshold} must be in (0, 1].")
  router = RouterConfig(feasible=feasible, hidden=_positive("model.router.hidden",
                                                             r.get("hidden", 256)),
                        threshold=threshold)
  return ModelConfig(
      vision=vision, text=text, visor=visor, router=router, feature_layer=fl,
      projector_bias=bool(m.get("projector_bias", True)), image_token_id=int(m.image_token_id),
      image_grid_pinpoints=pinpoints, vision_aspect_ratio=m.vision_aspect_ratio,
      dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=attention_impl,
      remat=bool(m.get("remat", False)))


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """big_vision-style `get_config(arg)` variants: 'key=value,key2=value2' over defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config arg {item!r}: expected key=value.")
    key, value = item.split("=", 1)
    if key not in out:
      raise ValueError(f"config arg {key!r} is not one of {sorted(out.keys())}.")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def resolve_config_path(spec: str) -> str:
  """A `--config` value ('configs/universal.py:model=tiny') whose file is found from any
  directory: as given when it exists (or is absolute), else the copy of configs/ that ships
  with the package (`pip install .` installs it as visor_jax/configs; a source checkout has
  it beside visor_jax/). The ':variant' suffix is kept. Anything else comes back unchanged,
  so ml_collections reports the path as typed."""
  path, colon, variant = spec.partition(":")
  if not path or os.path.isabs(path) or os.path.exists(path):
    return spec
  parts = os.path.normpath(path).split(os.sep)
  if parts[0] != "configs":
    return spec
  package = os.path.dirname(os.path.abspath(__file__))
  for root in (package, os.path.dirname(package)):  # installed copy, then source checkout
    candidate = os.path.join(root, *parts)
    if os.path.isfile(candidate):
      return candidate + colon + variant
  return spec
