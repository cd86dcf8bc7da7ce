"""One VISOR layer: the body that every loop over the LLM layers runs, so a change to how a
layer attends lands once. The loops are the forward of training and evaluation
(`VisorDecoder.run_layers`), prefill and decode (`inference/generate.py`).

    SA on:   [V; T] = layer([V; T])            the original layer, causal by position
    SA off:  T = layer(T + CA(T, V))           a CA layer: text reads vision, V unchanged
             T = layer(T)                      any other layer: text only

Two modes, told apart by `past` (as flax gemma's `cache=None`):
- `past=None` (forward, prefill): `t` and `v` are whole streams; the layer returns the new
  streams and the keys/values a KV cache keeps (`LayerKV`). The forward drops them: they are
  computed for the attention anyway, so keeping or dropping them costs nothing.
- `past` given (decode): `t` holds the new token(s), `v` is unused; the keys are the cached
  ones (`Past`) followed by the new token's own, which the layer returns for the cache.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from visor_jax.models.nn import Mask

Array = jax.Array
KV = tuple[Array, Array]  # keys, values float[B, S, K, H]


class Streams(NamedTuple):
  """Where the tokens sit in the original interleaved sequence (causality comes from these
  positions, not from array order) and which are real. Decoding: `text_*` describe the new
  token(s)."""
  text_pos: Array    # int32[B, T]
  vis_pos: Array     # int32[B, N]
  text_valid: Array  # bool[B, T]
  vis_valid: Array   # bool[B, N]


class LayerKV(NamedTuple):
  """What one layer gives the cache: the keys/values of its text tokens; of the visual tokens
  when it self-attended (`vis`); the CA module's projection of the visual tokens when it
  cross-attended (`ca`; zeros when a traced `ca` bit was off)."""
  text: KV
  vis: KV | None = None
  ca: KV | None = None


class Past(NamedTuple):
  """The cache one decode step reads for one layer."""
  text: KV             # float[B, T_max, K, H]: every text token so far (slots up to T_max)
  text_valid: Array    # bool[B, T_max]: the slots already written
  vis: KV | None       # SA layers: the visual keys/values of this layer
  ca: KV | None        # CA layers whose bit is off: the projected visual keys/values


def visor_layer(layer, cross: Callable[[], object] | None, t: Array, v: Array | None,
                s: Streams, *, sa: bool, ca: bool | Array, impl: str | None,
                past: Past | None = None) -> tuple[Array, Array | None, LayerKV]:
  """One layer → (text float[B, T, D], visual stream float[B, N, D] (None when decoding),
  `LayerKV`).

  layer: a `Qwen2Layer`. cross: makes this layer's `CrossAttention` on demand (a scan over
  the layers then slices CA weights only where it reads them); None when the model has no CA.
  sa: static (each caller picks the path at trace time or per `lax.switch` branch).
  ca: the CA read before a text-only layer; a Python bool, or a traced bool (`lax.cond`) in
  the scans whose layers differ in it.
  """
  if past is not None:
    return _decode(layer, cross, t, s, sa=sa, ca=ca, impl=impl, past=past)
  if sa:
    n = v.shape[1]
    pos = jnp.concatenate([s.vis_pos, s.text_pos], axis=1)
    valid = jnp.concatenate([s.vis_valid, s.text_valid], axis=1)
    x, k, val = layer.with_kv(jnp.concatenate([v, t], axis=1), pos,
                              Mask(valid, pos, pos, causal=True))
    return x[:, n:], x[:, :n], LayerKV(text=(k[:, n:], val[:, n:]), vis=(k[:, :n], val[:, :n]))
  ca_kv = None
  if cross is not None and ca is not False:
    t, ca_kv = _read_vision(cross, t, v, s, ca, impl)
  x, k, val = layer.with_kv(t, s.text_pos, Mask(s.text_valid, s.text_pos, s.text_pos,
                                                causal=True))
  return x, v, LayerKV(text=(k, val), ca=ca_kv)


def _read_vision(cross, t: Array, v: Array, s: Streams, ca: bool | Array, impl
                 ) -> tuple[Array, KV]:
  """t + CA(t, v) and the CA keys/values of v; under a traced `ca`, only where it is on."""
  def read(t):
    module = cross()
    kv = module.visual_kv(v, s.vis_pos)
    return t + module.read(t, *kv, s.text_pos, s.vis_pos, s.vis_valid, impl), kv

  if isinstance(ca, bool):
    return read(t)
  shape = jax.eval_shape(read, t)[1]
  zeros = tuple(jnp.zeros(a.shape, a.dtype) for a in shape)
  return jax.lax.cond(ca, read, lambda t: (t, zeros), t)


def _decode(layer, cross, t: Array, s: Streams, *, sa: bool, ca: bool, impl,
            past: Past) -> tuple[Array, None, LayerKV]:
  """The new token(s) against the cache: SA layers read [visual; text so far; new], the others
  [text so far; new], after a CA read of the cached projected visual tokens."""
  if sa:
    keys = tuple(jnp.concatenate([a, b], axis=1) for a, b in zip(past.vis, past.text))
    valid = jnp.concatenate([s.vis_valid, past.text_valid, s.text_valid], axis=1)
  else:
    if ca:
      t = t + cross().read(t, *past.ca, s.text_pos, s.vis_pos, s.vis_valid, impl)
    keys, valid = past.text, jnp.concatenate([past.text_valid, s.text_valid], axis=1)
  x, k, val = layer.with_kv(t, s.text_pos, Mask(valid, s.text_pos), keys)
  return x, None, LayerKV(text=(k, val))
