"""SigLIP vision tower (transformers' `SiglipVisionModel` without the pooling head).

Patch embedding (a stride-p conv written as a matmul over flattened patches), learned
positions, pre-LN encoder layers scanned over depth, and the post-LayerNorm (kept for checkpoint
parity; LLaVA-OV reads hidden states *before* it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from visor_jax import sharding
from visor_jax.config_lib import VisionConfig
from visor_jax.models.nn import Dense, LayerNorm, attention

Array = jax.Array


class SiglipLayer(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention_impl: str | None = None):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=True)
    self.norm1 = LayerNorm(d, cfg.layer_norm_eps, axis_name="vision_embed", param_dtype=param_dtype)
    self.q_proj = Dense(d, d, ("vision_embed", "vision_heads"), **kw)
    self.k_proj = Dense(d, d, ("vision_embed", "vision_heads"), **kw)
    self.v_proj = Dense(d, d, ("vision_embed", "vision_heads"), **kw)
    self.o_proj = Dense(d, d, ("vision_heads", "vision_embed"), **kw)
    self.norm2 = LayerNorm(d, cfg.layer_norm_eps, axis_name="vision_embed", param_dtype=param_dtype)
    self.fc1 = Dense(d, f, ("vision_embed", "vision_mlp"), **kw)
    self.fc2 = Dense(f, d, ("vision_mlp", "vision_embed"), **kw)
    self.num_heads = cfg.num_heads
    self.attention_impl = attention_impl

  def __call__(self, x: Array) -> Array:
    """x: float[N, P, D] (N crops of P patches)."""
    n, p, d = x.shape
    heads = lambda t: t.reshape(n, p, self.num_heads, d // self.num_heads)
    h = self.norm1(x)
    a = attention(heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h)), None,
                  implementation=self.attention_impl)
    x = x + self.o_proj(a.reshape(n, p, d))
    h = self.norm2(x)
    return x + self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))  # gelu_pytorch_tanh


class SiglipVisionTower(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str | None = None, remat: bool = False):
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.patch_embed = Dense(p * p * c, d, ("patch", "vision_embed"), bias=True, rngs=rngs,
                             dtype=dtype, param_dtype=param_dtype)
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_patches, d), param_dtype),
        out_sharding=(None, "vision_embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return SiglipLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         attention_impl=attention_impl)

    self.layers = make_layers(rngs)
    self.post_norm = LayerNorm(d, cfg.layer_norm_eps, axis_name="vision_embed",
                               param_dtype=param_dtype)

  def embed(self, pixels: Array) -> Array:
    """pixels: float[N, S, S, C] normalised crops → float[N, P, D] patch embeddings."""
    n, s, _, c = pixels.shape
    p, g = self.cfg.patch_size, s // self.cfg.patch_size
    # Row-major patches, each flattened as (row, col, channel): the torch conv weight
    # [D, C, p, p] maps to kernel [p*p*C, D] by permute(2, 3, 1, 0). Like the stride-p
    # 'valid' conv, trailing pixels that do not fill a patch are dropped (384 = 27*14 + 6).
    pixels = pixels[:, :g * p, :g * p]
    patches = pixels.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, g * g, p * p * c)
    return self.patch_embed(patches) + self.pos_embed[...].astype(self.dtype)

  def __call__(self, pixels: Array, feature_layers: tuple[int, ...]) -> Array:
    """Hidden states selected like transformers' `hidden_states[i]` and concatenated.

    hidden_states = [embeddings, layer_1, ..., layer_L] (pre post-LayerNorm). Only the layers
    up to the deepest one requested are run: LLaVA-OV's feature layer -1 runs all of them.
    Returns float[N, P, D * len(feature_layers)].
    """
    total = self.cfg.num_layers + 1
    wanted = [i % total for i in feature_layers]
    depth = max(wanted)
    x = self.embed(pixels)
    graphdef, state = nnx.split(self.layers)
    state = jax.tree.map(lambda a: a[:depth], state)

    def body(h, layer_state):
      h = sharding.constrain_batch(nnx.merge(graphdef, layer_state)(sharding.constrain_batch(h)))
      return h, h if len(wanted) > 1 else None

    if self.remat:  # keep only each layer's input for the backward pass (model.remat)
      body = jax.checkpoint(body)
    out, per_layer = jax.lax.scan(body, x, state)
    if len(wanted) == 1:
      return x if depth == 0 else out
    hs = [x] + [per_layer[i] for i in range(depth)]
    return jnp.concatenate([hs[i] for i in wanted], axis=-1)
