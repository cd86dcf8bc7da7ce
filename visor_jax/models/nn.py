"""Small building blocks shared by the vision tower and the LLM.

Every parameter names its *logical* axes (e.g. ('embed', 'mlp')); `sharding.py` maps them to
mesh axes from the config's rules table. Compute runs in `dtype`; parameters are stored in
`param_dtype`; norm statistics and softmax are always float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from visor_jax.config_lib import ATTENTION_IMPLS
from visor_jax.models.blockwise_attention import blockwise_attention
from visor_jax.models.cudnn_attention import cudnn_attention, use_cudnn
from visor_jax.models.splash_attention import splash_attention, use_splash

Array = jax.Array
DEFAULT_INIT = nnx.initializers.normal(0.02)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel float[in, out] (torch Linear weight transposed), or
  float[out, in] once `transpose_kernel` has run (the serving layout, `visor.serving_layout`)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=DEFAULT_INIT):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (d_in, d_out), param_dtype),
                            out_sharding=axes)
    self.bias = (nnx.Param(jnp.zeros((d_out,), param_dtype), out_sharding=(axes[1],))
                 if bias else None)
    self.dtype = dtype
    self.out_in = False  # kernel stored float[out, in]

  def __call__(self, x: Array) -> Array:
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    y = jnp.einsum("...i,oi->...o", x, kernel) if self.out_in else jnp.dot(x, kernel)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def transpose_kernel(self) -> None:
    """Stores the kernel as float[out, in] (a copy), so each output is a contiguous dot
    product: a one-token decode step's matrix-vector products then stream the weights faster
    (on this CPU a 24-layer chain of the 0.5B MLP's products 37 vs 47-50 ms, the whole decode
    step ~10 %, README "Benchmarks"); many-token matmuls run the same either way."""
    if not self.out_in:
      axes = self.kernel.get_metadata().get("out_sharding")
      self.kernel.set_value(self.kernel[...].T)
      if axes:
        self.kernel.set_metadata(out_sharding=tuple(axes)[::-1])
      self.out_in = True


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


@jax.tree_util.register_pytree_node_class
class Mask:
  """Which keys each query may see, given implicitly so no [T, S] array need exist.

  Query i sees key j iff k_valid[j] and, when `causal`, k_pos[j] <= q_pos[i]. Positions, not
  array order, define causality, so the visual and text streams may be concatenated in any
  order and still reproduce the original interleaved causal mask.

  k_valid bool[B, S]; q_pos int32[B, T] and k_pos int32[B, S] (only read when causal).
  The 'blockwise' implementation builds the mask per block from these; the others get
  `dense()`.
  """

  def __init__(self, k_valid: Array, q_pos: Array | None = None, k_pos: Array | None = None,
               *, causal: bool = False):
    if causal and (q_pos is None or k_pos is None):
      raise ValueError("Mask(causal=True) needs q_pos and k_pos.")
    self.k_valid, self.q_pos, self.k_pos, self.causal = k_valid, q_pos, k_pos, causal

  def tree_flatten(self):
    return (self.k_valid, self.q_pos, self.k_pos), self.causal

  @classmethod
  def tree_unflatten(cls, causal, children):
    return cls(*children, causal=causal)

  def dense(self, num_queries: int | None = None) -> Array:
    """bool[B, 1, T, S] (T = num_queries when not causal and q_pos is None)."""
    if self.causal:
      return ((self.k_pos[:, None, None, :] <= self.q_pos[:, None, :, None])
              & self.k_valid[:, None, None, :])
    t = self.q_pos.shape[1] if num_queries is None else num_queries
    b, s = self.k_valid.shape
    return jnp.broadcast_to(self.k_valid[:, None, None, :], (b, 1, t, s))

  def has_key(self, num_queries: int | None = None) -> Array:
    """bool[B, T]: the query sees at least one key. O(T + S): no [T, S] array."""
    if self.causal:
      big = jnp.iinfo(jnp.int32).max
      k_min = jnp.min(jnp.where(self.k_valid, self.k_pos, big), axis=-1, initial=big)  # S may be 0
      return self.q_pos >= k_min[:, None]
    t = self.q_pos.shape[1] if num_queries is None else num_queries
    return jnp.broadcast_to(jnp.any(self.k_valid, axis=-1)[:, None], (self.k_valid.shape[0], t))


def default_implementation() -> str:
  """What None means: 'blockwise' on CPU (no [T, S] array; the whole LLaVA-OV forward 1.3x
  faster, README "Benchmarks"), 'xla' elsewhere (TPU users pick 'splash', GPU users 'cudnn')."""
  return "blockwise" if jax.default_backend() == "cpu" else "xla"


def check_implementation(implementation: str | None) -> str:
  """None → `default_implementation()`; anything not in ATTENTION_IMPLS is an error."""
  impl = default_implementation() if implementation is None else implementation
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {implementation!r} (model.attention_impl) is "
                     f"not one of {ATTENTION_IMPLS} or None.")
  return impl


def attention(q: Array, k: Array, v: Array, mask: Array | Mask | None, *,
              implementation: str | None = None) -> Array:
  """Scaled dot-product attention; the one switch point for an attention kernel.

  q: float[B, T, N, H]; k, v: float[B, S, K, H] with N % K == 0 (grouped-query);
  mask: a `Mask`, a dense bool[B, 1|N, T, S] (True = may attend), or None. Softmax runs in
  float32. → float[B, T, N, H]. A query row that sees no key gets the uniform average of v
  (jax.nn.dot_product_attention's 'xla' behaviour, which 'blockwise' reproduces; callers that
  care, like cross-attention, zero such rows themselves via `Mask.has_key`).

  implementation (`model.attention_impl`): None — `default_implementation()`; 'xla' —
  jax.nn.dot_product_attention's XLA path (materialises the float32 [B, N, T, S]
  probabilities); 'cudnn' — its cuDNN fused kernel (GPU, bf16/fp16) for unmasked and causal
  self-attention (`cudnn_attention`), 'blockwise' for the rest; 'blockwise' —
  `blockwise_attention`, flash-style, no [T, S] array when `mask` is a `Mask`, and key blocks
  wholly after a query block's last position are skipped; 'splash' —
  the Pallas TPU kernel (`splash_attention`; interpret mode off TPU) for unmasked and causal
  self-attention, 'blockwise' for the rest.
  """
  impl = check_implementation(implementation)
  if impl == "splash" and use_splash(mask):
    return splash_attention(q, k, v, mask)
  if impl == "cudnn" and use_cudnn(mask):
    return cudnn_attention(q, k, v, mask)
  if impl in ("blockwise", "splash", "cudnn"):  # the kernels' other cases: exact for any mask
    if isinstance(mask, Mask):
      return blockwise_attention(q, k, v, q_pos=mask.q_pos, k_pos=mask.k_pos,
                                 k_valid=mask.k_valid, causal=mask.causal)
    return blockwise_attention(q, k, v, mask=mask)
  if isinstance(mask, Mask):
    mask = mask.dense(q.shape[1])
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def causal_mask(q_pos: Array, k_pos: Array, k_valid: Array) -> Array:
  """bool[B, 1, T, S]: query at position p sees valid keys at positions <= p (`Mask.dense`)."""
  return Mask(k_valid, q_pos, k_pos, causal=True).dense()
