"""Budget-aware generation: prefill + decode with a KV cache that keeps VISOR's saving.

The cache holds, per request group (one budget per group):
  text_k/v  float[L, B, T_max, K, H]  every layer's text keys/values (prompt + generated)
  vis_k/v   float[S, B, N, K, H]      visual keys/values only for the S layers that ran SA
  ca_k/v    float[C, B, N, K, H]      visual keys/values of the C CA layers that run (bit
                                      off), projected once per image

Requests are grouped by budget (the router's choice or a fixed one), so a cheap sample never
pays for an expensive neighbour: each group runs its own prefill/decode, compiled once per
(batch shape, number of SA layers); which layers are SA stays data. The router runs on the
whole batch first (`LlavaOnevision.route`: vision tower + the layers before the first SA
candidate), and the groups reuse its packed visual tokens, so the tower runs once.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visor_jax import budgets, distributed
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax.models.nn import Mask
from visor_jax.models.router import last_prompt_index

Array = jax.Array


def _layer_tables(cfg, bits: np.ndarray) -> dict[str, np.ndarray]:
  """Per-layer data for one group's budget: the SA bit; whether the layer runs cross-attention
  (a CA layer whose bit is off) and which stacked CA module it uses; and the slots of the
  visual caches (SA layers, active CA layers) it writes. Slots exist only for layers that run."""
  bits = np.asarray(bits, bool)
  is_ca = np.zeros(cfg.num_layers, bool)
  ca_module = np.zeros(cfg.num_layers, np.int32)
  ca_module[list(cfg.visor.ca_layers)] = np.arange(len(cfg.visor.ca_layers))
  is_ca[list(cfg.visor.ca_layers)] = True
  is_ca &= ~bits
  slot = lambda on: np.where(on, np.cumsum(on) - 1, 0).astype(np.int32)
  return dict(bits=bits, is_ca=is_ca, ca_module=ca_module, ca_slot=slot(is_ca),
              sa_slot=slot(bits))


def prefill(model: LlavaOnevision, inputs: Mapping[str, Array], vis: Array,
            tables: Mapping[str, Array], *, num_sa: int, num_ca: int, max_len: int):
  """Runs the prompt; returns (next-token logits float32[B, V], cache).

  vis: packed visual tokens float[B, N, D] (before the positional conv), from `route` or
  `visual_tokens`. Every sample of the batch uses the same budget `tables['bits']`.
  """
  dec, cfg = model.decoder, model.cfg
  t = model.embed[...][inputs["tokens"]].astype(model.dtype)
  v = dec.pos_conv(vis, inputs["vis_valid"]) if dec.pos_conv is not None else vis
  text_pos, vis_pos = inputs["text_pos"], inputs["vis_pos"]
  text_valid, vis_valid = inputs["text_valid"], inputs["vis_valid"]
  b, n = v.shape[:2]
  all_pos = jnp.concatenate([vis_pos, text_pos], axis=1)
  all_valid = jnp.concatenate([vis_valid, text_valid], axis=1)
  text_mask = Mask(text_valid, text_pos, text_pos, causal=True)
  full_mask = Mask(all_valid, all_pos, all_pos, causal=True)
  kv_shape = (b, n, cfg.text.num_kv_heads, cfg.text.head_dim)
  zeros = lambda count: jnp.zeros((count, *kv_shape), t.dtype)
  layer_def, layer_state = nnx.split(dec.layers)
  if dec.cross is not None:
    cross_def, cross_state = nnx.split(dec.cross)

  def body(carry, xs):
    st, bit, is_ca, ca_module, ca_slot, sa_slot = xs
    layer = nnx.merge(layer_def, st)

    def sa(c):
      t, v, vk, vv, ck, cv = c
      x, k, val = layer.with_kv(jnp.concatenate([v, t], axis=1), all_pos, full_mask)
      vk, vv = vk.at[sa_slot].set(k[:, :n]), vv.at[sa_slot].set(val[:, :n])
      return (x[:, n:], x[:, :n], vk, vv, ck, cv), (k[:, n:], val[:, n:])

    def text(c):
      t, v, vk, vv, ck, cv = c
      if num_ca:
        def with_ca(ops):
          t, ck, cv = ops
          ca = nnx.merge(cross_def, jax.tree.map(lambda a: a[ca_module], cross_state))
          k, val = ca.visual_kv(v, vis_pos)
          t = t + ca.read(t, k, val, text_pos, vis_pos, vis_valid, cfg.attention_impl)
          return t, ck.at[ca_slot].set(k), cv.at[ca_slot].set(val)
        t, ck, cv = jax.lax.cond(is_ca, with_ca, lambda ops: ops, (t, ck, cv))
      x, k, val = layer.with_kv(t, text_pos, text_mask)
      return (x, v, vk, vv, ck, cv), (k, val)

    if not num_sa:  # static: no layer of this budget self-attends (and empty caches)
      return text(carry)
    return jax.lax.cond(bit, sa, text, carry)

  carry = (t, v, zeros(num_sa), zeros(num_sa), zeros(num_ca), zeros(num_ca))
  xs = (layer_state, tables["bits"], tables["is_ca"], tables["ca_module"], tables["ca_slot"],
        tables["sa_slot"])
  (t, _, vk, vv, ck, cv), (tk, tv) = jax.lax.scan(body, carry, xs)
  pad = ((0, 0), (0, 0), (0, max_len - tk.shape[2]), (0, 0), (0, 0))
  cache = dict(text_k=jnp.pad(tk, pad), text_v=jnp.pad(tv, pad), vis_k=vk, vis_v=vv,
               ca_k=ck, ca_v=cv)
  last = t[jnp.arange(b), last_prompt_index(text_valid)]
  return model.logits(dec.norm(last)[:, None])[:, 0], cache


def decode_step(model: LlavaOnevision, token: Array, pos: Array, index: Array,
                cache: dict, vis_pos: Array, vis_valid: Array, tables: Mapping[str, Array]):
  """One new token per sample → (logits float32[B, V], updated cache).

  token int32[B]; pos int32[B] its position in the original sequence; index int32[B] its slot
  in the text cache (= number of text tokens before it).
  """
  dec, cfg = model.decoder, model.cfg
  x = model.embed[...][token][:, None].astype(model.dtype)
  pos1 = pos[:, None]
  b, t_max = cache["text_k"].shape[1:3]
  past_text = jnp.arange(t_max)[None, :] < index[:, None]           # bool[B, T_max]
  new = jnp.ones((b, 1), bool)
  num_sa, num_ca = cache["vis_k"].shape[0], cache["ca_k"].shape[0]
  layer_def, layer_state = nnx.split(dec.layers)
  if dec.cross is not None:
    cross_def, cross_state = nnx.split(dec.cross)
  rows = jnp.arange(b)

  def body(x, xs):
    st, bit, is_ca, ca_module, ca_slot, sa_slot, tk, tv = xs
    layer = nnx.merge(layer_def, st)

    def sa(x):
      past = (jnp.concatenate([cache["vis_k"][sa_slot], tk], axis=1),
              jnp.concatenate([cache["vis_v"][sa_slot], tv], axis=1))
      valid = jnp.concatenate([vis_valid, past_text, new], axis=1)
      return layer.with_kv(x, pos1, Mask(valid, pos1), past)

    def text(x):
      if num_ca:
        def with_ca(x):
          ca = nnx.merge(cross_def, jax.tree.map(lambda a: a[ca_module], cross_state))
          return x + ca.read(x, cache["ca_k"][ca_slot], cache["ca_v"][ca_slot], pos1, vis_pos,
                             vis_valid, cfg.attention_impl)
        x = jax.lax.cond(is_ca, with_ca, lambda x: x, x)
      valid = jnp.concatenate([past_text, new], axis=1)
      return layer.with_kv(x, pos1, Mask(valid, pos1), (tk, tv))

    x, k, v = jax.lax.cond(bit, sa, text, x) if num_sa else text(x)
    return x, (tk.at[rows, index].set(k[:, 0]), tv.at[rows, index].set(v[:, 0]))

  xs = (layer_state, tables["bits"], tables["is_ca"], tables["ca_module"], tables["ca_slot"],
        tables["sa_slot"], cache["text_k"], cache["text_v"])
  x, (tk, tv) = jax.lax.scan(body, x, xs)
  return model.logits(dec.norm(x))[:, 0], {**cache, "text_k": tk, "text_v": tv}


def sample_token(logits: Array, key: Array, temperature: float, top_p: float) -> Array:
  """Greedy at temperature 0; else nucleus sampling over the smallest set with mass top_p."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  # the smallest logit still inside the nucleus (always keeps the top token)
  cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray      # int32[B, max_new_tokens], -1 after a sample stopped
  num_tokens: np.ndarray  # int32[B] generated tokens (including the stop token)
  budget: np.ndarray      # bool[B, L] the budget each sample ran with
  cache_bytes: np.ndarray  # int64[B] KV-cache bytes per sample (its group's cache / group size)


class Generator:
  """Compiled prefill/decode for one model; `generate` groups requests by budget."""

  def __init__(self, model: LlavaOnevision):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    g = self.graphdef
    self._route = jax.jit(lambda st, x, th: nnx.merge(g, st).route(x, th))
    self._visual = jax.jit(lambda st, x: nnx.merge(g, st).visual_tokens(
        x["pixels"], x["vis_src"], x["vis_weight"], x["vis_newline"]))
    self._prefill = jax.jit(
        lambda st, x, vis, tables, num_sa, num_ca, max_len: prefill(
            nnx.merge(g, st), x, vis, tables, num_sa=num_sa, num_ca=num_ca, max_len=max_len),
        static_argnums=(4, 5, 6))
    self._decode = jax.jit(
        lambda st, *args: decode_step(nnx.merge(g, st), *args), donate_argnums=(4,))

  def generate(self, inputs: Mapping[str, np.ndarray], *, budget: np.ndarray | None = None,
               threshold: float | None = None, max_new_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
               seed: int = 0) -> Generation:
    """Generates for a collated batch. `budget` bool[B, L] fixes budgets; None → the router
    picks them (at cost knob `threshold`)."""
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    b = inputs["tokens"].shape[0]
    if budget is None:
      budget, vis = self._route(self.state, inputs, threshold)
    else:
      vis = self._visual(self.state, inputs)
    budgets.check_mask(self.cfg, budget, b)
    # With several processes (the trainer's end-of-run evaluation of FSDP-sharded weights)
    # outputs may span every host's devices: each host reads the whole value.
    budget = np.asarray(distributed.fetchable(budget), bool)
    vis = np.asarray(distributed.fetchable(vis))
    out = Generation(np.full((b, max_new_tokens), -1, np.int32), np.zeros(b, np.int32),
                     budget, np.zeros(b, np.int64))
    key = jax.random.key(seed)
    for row in np.unique(budget, axis=0):
      idx = np.flatnonzero((budget == row).all(axis=1))
      key, sub = jax.random.split(key)
      self._generate_group(idx, row, {k: v[idx] for k, v in inputs.items()}, vis[idx], out,
                           max_new_tokens, temperature, top_p, stop_ids, sub)
    return out

  def _generate_group(self, idx, row, x, vis, out, max_new, temperature, top_p, stop_ids, key):
    # Pad the group to a power of two (repeating its first request) so group sizes share
    # compilations: at most log2(B) + 1 programs per number of SA layers.
    n, padded = len(idx), 1 << (len(idx) - 1).bit_length()
    if padded > n:
      take = np.r_[np.arange(n), np.zeros(padded - n, int)]
      x, vis = {k: v[take] for k, v in x.items()}, vis[take]
    np_tables = _layer_tables(self.cfg, row)
    tables = {k: jnp.asarray(v) for k, v in np_tables.items()}
    text_len = x["text_valid"].sum(axis=1).astype(np.int32)
    max_len = x["tokens"].shape[1] + max_new
    logits, cache = self._prefill(self.state, x, vis, tables, int(row.sum()),
                                  int(np_tables["is_ca"].sum()), max_len)
    out.cache_bytes[idx] = sum(int(c.nbytes) for c in cache.values()) // padded
    last_pos = np.maximum(x["text_pos"][np.arange(padded), text_len - 1],
                          np.max(np.where(x["vis_valid"], x["vis_pos"], -1), axis=1))
    pos, index = last_pos + 1, text_len.copy()
    done = np.zeros(padded, bool)
    done[n:] = True  # padding rows: computed, never recorded
    stop = np.asarray(list(stop_ids), np.int32)
    for step in range(max_new):
      key, sub = jax.random.split(key)
      token = np.asarray(sample_token(distributed.fetchable(logits), sub, temperature, top_p))
      live = ~done[:n]
      out.tokens[idx[live], step] = token[:n][live]
      out.num_tokens[idx[live]] += 1
      done |= np.isin(token, stop)
      if done.all() or step == max_new - 1:
        break
      logits, cache = self._decode(self.state, jnp.asarray(token), jnp.asarray(pos, jnp.int32),
                                   jnp.asarray(index, jnp.int32), cache, x["vis_pos"],
                                   x["vis_valid"], tables)
      pos, index = pos + 1, index + 1


def generate(model: LlavaOnevision, inputs: Mapping[str, np.ndarray], **kwargs) -> Generation:
  """One-off `Generator(model).generate(...)`; keep a `Generator` to reuse its compilations."""
  return Generator(model).generate(inputs, **kwargs)
