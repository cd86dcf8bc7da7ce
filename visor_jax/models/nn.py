"""Small building blocks shared by the vision tower and the LLM.

Every parameter names its *logical* axes (e.g. ('embed', 'mlp')); `sharding.py` maps them to
mesh axes from the config's rules table. Compute runs in `dtype`; parameters are stored in
`param_dtype`; norm statistics and softmax are always float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
DEFAULT_INIT = nnx.initializers.normal(0.02)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel float[in, out] (torch Linear weight transposed)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=DEFAULT_INIT):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (d_in, d_out), param_dtype),
                            out_sharding=axes)
    self.bias = (nnx.Param(jnp.zeros((d_out,), param_dtype), out_sharding=(axes[1],))
                 if bias else None)
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Qwen2 RMSNorm: statistics in float32, then scaled in the input dtype (as transformers)."""

  def __init__(self, dim: int, eps: float, *, axis_name: str = "embed", param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
  """Two-pass LayerNorm with float32 statistics (matches torch.nn.LayerNorm)."""

  def __init__(self, dim: int, eps: float, *, axis_name: str, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half convention (Qwen2/Llama in transformers).

  x: float[B, T, N, H]; positions: int32[B, T]. Angles are computed in float32.
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]       # [B, T, 1, H]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(q: Array, k: Array, v: Array, mask: Array | None, *,
              implementation: str | None = None) -> Array:
  """Scaled dot-product attention; the one switch point for a TPU/GPU kernel.

  q: float[B, T, N, H]; k, v: float[B, S, K, H] with N % K == 0 (grouped-query);
  mask: bool[B, 1|N, T, S] (True = may attend) or None. Softmax runs in float32.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def causal_mask(q_pos: Array, k_pos: Array, k_valid: Array) -> Array:
  """bool[B, 1, T, S]: query at position p sees valid keys at positions <= p.

  Positions, not array order, define causality, so the visual and text streams may be
  concatenated in any order and still reproduce the original interleaved causal mask.
  """
  return ((k_pos[:, None, None, :] <= q_pos[:, None, :, None])
          & k_valid[:, None, None, :])
