"""Qwen2 decoder layer: RMSNorm, grouped-query attention with q/k/v bias and RoPE, SwiGLU MLP.

One layer is a pure function of (hidden states, positions, mask); the VISOR decoder decides
which tokens go through it (text only, or [vision; text]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from visor_jax.config_lib import TextConfig
from visor_jax.models.nn import Dense, Mask, RMSNorm, attention, rope

Array = jax.Array


class Qwen2Attention(nnx.Module):
  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
               use_rope: bool = True, o_init=None):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Dense(d, n * h, ("embed", "q_heads"), bias=True, **kw)
    self.k_proj = Dense(d, k * h, ("embed", "kv_heads"), bias=True, **kw)
    self.v_proj = Dense(d, k * h, ("embed", "kv_heads"), bias=True, **kw)
    o_kw = {} if o_init is None else dict(kernel_init=o_init)
    self.o_proj = Dense(n * h, d, ("q_heads", "embed"), bias=False, **kw, **o_kw)
    self.n, self.k, self.h = n, k, h
    self.theta = cfg.rope_theta if use_rope else None

  def project_q(self, x: Array, pos: Array) -> Array:
    """float[B, T, D] → float[B, T, N, H], rotated if this attention uses RoPE."""
    q = self.q_proj(x).reshape(*x.shape[:2], self.n, self.h)
    return q if self.theta is None else rope(q, pos, self.theta)

  def project_kv(self, x: Array, pos: Array) -> tuple[Array, Array]:
    """float[B, S, D] → k, v float[B, S, K, H] (k rotated if RoPE)."""
    k = self.k_proj(x).reshape(*x.shape[:2], self.k, self.h)
    v = self.v_proj(x).reshape(*x.shape[:2], self.k, self.h)
    return (k if self.theta is None else rope(k, pos, self.theta)), v

  def output(self, a: Array) -> Array:
    return self.o_proj(a.reshape(*a.shape[:2], self.n * self.h))


class Qwen2MLP(nnx.Module):
  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=False)
    self.gate_proj = Dense(d, f, ("embed", "mlp"), **kw)
    self.up_proj = Dense(d, f, ("embed", "mlp"), **kw)
    self.down_proj = Dense(f, d, ("mlp", "embed"), **kw)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Layer(nnx.Module):
  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str | None = None):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = Qwen2Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = Qwen2MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention_impl = attention_impl

  def __call__(self, x: Array, pos: Array, mask: Mask | Array) -> Array:
    """x: float[B, S, D]; pos: int32[B, S]; mask: a `Mask` over S keys or a dense
    bool[B, 1, S, S] → float[B, S, D]."""
    return self.with_kv(x, pos, mask)[0]

  def with_kv(self, x: Array, pos: Array, mask: Mask | Array,
              past: tuple[Array, Array] | None = None) -> tuple[Array, Array, Array]:
    """The layer, also returning the keys/values of x (for a KV cache).

    past: cached (k, v) float[B, P, K, H] that x's queries also attend to (decoding); the mask
    is then over the P + S keys [past; x]. Returns (out float[B, S, D], k, v of x).
    """
    h = self.input_norm(x)
    k, v = self.attn.project_kv(h, pos)
    keys, values = (k, v) if past is None else (jnp.concatenate([past[0], k], axis=1),
                                                 jnp.concatenate([past[1], v], axis=1))
    a = attention(self.attn.project_q(h, pos), keys, values, mask,
                  implementation=self.attention_impl)
    x = x + self.attn.output(a)
    return x + self.mlp(self.post_attn_norm(x)), k, v
