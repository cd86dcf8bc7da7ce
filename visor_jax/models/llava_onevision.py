"""LLaVA-OneVision with VISOR layers: vision tower → projector → AnyRes packing → VISOR decoder.

Inputs (built on the host by `visor_jax.data.inputs`; all static shapes, padded):

  tokens      int32[B, T]          text token ids; the image placeholder is *not* among them
  text_pos    int32[B, T]          each text token's position in the original interleaved sequence
  text_valid  bool[B, T]
  pixels      float32[B, P, S, S, 3]  normalised crops (NHWC), zero crops as padding
  vis_src     int32[B, N, 4]       AnyRes packing plan: 4 bilinear taps into the sample's
  vis_weight  float32[B, N, 4]       flattened [P * patches] projected features
  vis_newline bool[B, N]           token is `image_newline`
  vis_pos     int32[B, N]          each visual token's position in the original sequence
  vis_valid   bool[B, N]
  budget      bool[B, L]           which LLM layers run full self-attention, per sample

The packing plan makes AnyRes (base view + crop grid, unpadding, `anyres_max_N` bilinear
down-sampling, a newline after each row) a data-dependent gather, so images of any size share
one compiled program.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from visor_jax import budgets
from visor_jax.config_lib import ModelConfig
from visor_jax.models.nn import Dense
from visor_jax.models.siglip import SiglipVisionTower
from visor_jax.models.visor import VisorDecoder

Array = jax.Array
INPUT_KEYS = ("tokens", "text_pos", "text_valid", "pixels", "vis_src", "vis_weight",
              "vis_newline", "vis_pos", "vis_valid")


class LlavaOnevision(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d, v = cfg.text.hidden_size, cfg.text.vocab_size
    self.cfg, self.dtype = cfg, dtype
    self.vision = SiglipVisionTower(cfg.vision, **kw, attention_impl=cfg.attention_impl,
                                    remat=cfg.remat)
    d_feat = cfg.vision.hidden_size * len(cfg.feature_layers)
    self.projector_1 = Dense(d_feat, d, ("vision_embed", "embed"), bias=cfg.projector_bias, **kw)
    self.projector_2 = Dense(d, d, ("embed", "embed_out"), bias=cfg.projector_bias, **kw)
    self.image_newline = nnx.Param(
        nnx.initializers.normal(1 / math.sqrt(d))(rngs.params(), (d,), param_dtype),
        out_sharding=("embed",))
    self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (v, d), param_dtype),
                           out_sharding=("vocab", "embed"))
    self.decoder = VisorDecoder(cfg, **kw)
    self.lm_head = (None if cfg.text.tie_word_embeddings else
                    Dense(d, v, ("embed", "vocab"), bias=False, **kw))

  def visual_tokens(self, pixels: Array, src: Array, weight: Array, newline: Array) -> Array:
    """Crops → packed visual tokens float[B, N, D] in LLaVA-OV's order."""
    b, p = pixels.shape[:2]
    feats = self.vision(pixels.reshape(b * p, *pixels.shape[2:]).astype(self.dtype),
                        self.cfg.feature_layers)
    feats = self.projector_2(jax.nn.gelu(self.projector_1(feats), approximate=False))
    feats = feats.reshape(b, -1, feats.shape[-1])                        # [B, P*patches, D]
    taps = jax.vmap(lambda f, s: f[s])(feats, src)                        # [B, N, 4, D]
    packed = jnp.einsum("bnk,bnkd->bnd", weight.astype(feats.dtype), taps)
    return jnp.where(newline[..., None], self.image_newline[...].astype(feats.dtype), packed)

  def streams(self, inputs: Mapping[str, Array]) -> tuple[Array, Array]:
    """The decoder's two inputs: text embeddings float[B, T, D], packed visual tokens
    float[B, N, D] (before VISOR's positional conv)."""
    text = self.embed[...][inputs["tokens"]].astype(self.dtype)
    return text, self.visual_tokens(inputs["pixels"], inputs["vis_src"], inputs["vis_weight"],
                                    inputs["vis_newline"])

  def hidden_states(self, inputs: Mapping[str, Array], budget: Array | None,
                    threshold=None, *, unroll: bool = False) -> tuple[Array, Array, Array | None]:
    """(final-normed text hidden states float[B, T, D], budget used, router logits).
    `unroll`: a per-budget program (FLOPs cross-check only; `VisorDecoder.run_layers`)."""
    validate_inputs(self.cfg, inputs, budget)
    text, vis = self.streams(inputs)
    return self.decoder(text, vis, inputs["text_pos"], inputs["vis_pos"],
                        inputs["text_valid"], inputs["vis_valid"], budget, threshold,
                        unroll=unroll)

  def logits(self, hidden: Array) -> Array:
    """float[B, T, D] → float32[B, T, V]."""
    if self.lm_head is None:
      return jnp.dot(hidden, self.embed[...].astype(hidden.dtype).T).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(self, inputs: Mapping[str, Array], budget: Array, *, unroll: bool = False
               ) -> Array:
    """Next-token logits for the text tokens, float32[B, T, V], at a given budget
    (`budgets.mask`: bool[B, L]; data, so every budget shares one program)."""
    return self.logits(self.hidden_states(inputs, budget, unroll=unroll)[0])

  def prefix_hidden(self, inputs: Mapping[str, Array]) -> tuple[Array, Array]:
    """Text hidden states entering the first SA-candidate layer, float[B, T, D] (the router's
    input), and the packed visual tokens float[B, N, D]: only the vision tower and the layers
    before the first candidate run (no feasible budget turns on an earlier layer)."""
    validate_inputs(self.cfg, inputs, None)
    dec = self.decoder
    text, vis = self.streams(inputs)
    v = dec.pos_conv(vis, inputs["vis_valid"]) if dec.pos_conv is not None else vis
    args = (inputs["text_pos"], inputs["vis_pos"], inputs["text_valid"], inputs["vis_valid"])
    off = jnp.zeros((text.shape[0], self.cfg.num_layers), bool)
    text, _ = dec.run_layers(text, v, *args, off, 0, min(self.cfg.visor.sa_candidates))
    return text, vis

  def route(self, inputs: Mapping[str, Array], threshold=None) -> tuple[Array, Array]:
    """Only what the router needs → (budget bool[B, L], packed visual tokens float[B, N, D]),
    so generation can group samples by budget and reuse the visual tokens."""
    if self.decoder.router is None:
      raise ValueError("route: this model has no router (model.router.feasible is empty).")
    text, vis = self.prefix_hidden(inputs)
    budget, _ = self.decoder.route(text, inputs["text_valid"], threshold)
    return budget, vis

  def routed(self, inputs: Mapping[str, Array], threshold=None) -> dict[str, Array]:
    """The router picks each sample's budget mid-prefill: {'logits', 'budget',
    'router_logits'}; `threshold` is the cost knob (an argument: no recompilation)."""
    hidden, budget, router_logits = self.hidden_states(inputs, None, threshold)
    return {"logits": self.logits(hidden), "budget": budget, "router_logits": router_logits}


def abstract_inputs(cfg: ModelConfig, batch: int, text: int, crops: int, visual: int
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes/dtypes of a model input batch, for `jax.eval_shape` / `lower` without data."""
  s, sds = cfg.vision.image_size, jax.ShapeDtypeStruct
  b, t, p, n = batch, text, crops, visual
  return dict(
      tokens=sds((b, t), jnp.int32), text_pos=sds((b, t), jnp.int32),
      text_valid=sds((b, t), jnp.bool_), pixels=sds((b, p, s, s, 3), jnp.float32),
      vis_src=sds((b, n, 4), jnp.int32), vis_weight=sds((b, n, 4), jnp.float32),
      vis_newline=sds((b, n), jnp.bool_), vis_pos=sds((b, n), jnp.int32),
      vis_valid=sds((b, n), jnp.bool_))


def validate_inputs(cfg: ModelConfig, inputs: Mapping[str, Array], budget) -> None:
  """Shape/dtype checks on the host, before tracing: errors name the offending input."""
  missing = [k for k in INPUT_KEYS if k not in inputs]
  if missing:
    raise ValueError(f"model inputs are missing {missing}.")
  shape = lambda key: tuple(inputs[key].shape)
  if len(shape("tokens")) != 2:
    raise ValueError(f"tokens: expected int32[B, T], got shape {shape('tokens')}.")
  b, t = shape("tokens")
  s = cfg.vision.image_size
  px = inputs["pixels"]
  if len(px.shape) != 5 or tuple(px.shape[2:]) != (s, s, cfg.vision.num_channels):
    raise ValueError(f"pixels: expected float[B, P, {s}, {s}, {cfg.vision.num_channels}] "
                     f"normalised crops, got shape {tuple(px.shape)}.")
  if not jnp.issubdtype(px.dtype, jnp.floating):
    raise ValueError(f"pixels: expected a float dtype (normalised crops), got {px.dtype}; "
                     "run images through visor_jax.data.preprocess first.")
  n = shape("vis_src")[1] if len(shape("vis_src")) == 3 else -1
  expected = {"text_pos": (b, t), "text_valid": (b, t), "vis_src": (b, n, 4),
              "vis_weight": (b, n, 4), "vis_newline": (b, n), "vis_pos": (b, n),
              "vis_valid": (b, n)}
  for key, expected_shape in expected.items():
    if shape(key) != expected_shape:
      raise ValueError(f"{key}: expected shape {expected_shape}, got {shape(key)}.")
  if budget is not None:
    budgets.check_mask(cfg, budget, b)
