"""Budget-aware generation: prefill + decode with a KV cache that keeps VISOR's saving.

The cache holds, per request group (one budget per group), one array per layer:
  text_k/v  L x float[B, T_max, K, H]  every layer's text keys/values (prompt + generated)
  vis_k/v   S x float[B, N, K, H]      visual keys/values only for the S layers that ran SA
  ca_k/v    C x float[B, N, K, H]      visual keys/values of the C CA layers that run (bit
                                       off), projected once per image

Requests are grouped by budget (the router's choice or a fixed one), so a cheap sample never
pays for an expensive neighbour: each group runs its own prefill, compiled once per (batch
shape, number of SA layers; which layers are SA stays data), and its own decode step, compiled
once per (batch shape, budget). Both are unrolled over the layers of the serving layout
(`visor.serving_layout`: per-layer weights), so a pass reads each weight in place and copies
none. The router runs on the whole batch first (`LlavaOnevision.route`: vision tower + the
layers before the first SA candidate), and the groups reuse its packed visual tokens, so the
tower runs once.

Prefill and decode step through the same layer body as the training forward
(`models/visor_layer.py`): they differ only in what they keep (prefill the keys/values) and
what they attend to (decode: the cache).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visor_jax import budgets, distributed
from visor_jax.models import visor
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax.models.router import last_prompt_index
from visor_jax.models.visor_layer import Past, Streams, visor_layer

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

  model: the per-layer serving layout (`visor.serving_layout`). vis: packed visual tokens
  float[B, N, D] (before the positional conv), from `route` or `visual_tokens`. Every sample
  of the batch uses the same budget `tables['bits']`, data: one program per number of SA
  layers, each layer a `lax.cond` between its SA and its text path.
  """
  dec, cfg = model.decoder, model.cfg
  _check_per_layer(dec)
  t = model.embed[...][inputs["tokens"]].astype(model.dtype)
  v = dec.pos_conv(vis, inputs["vis_valid"]) if dec.pos_conv is not None else vis
  streams = Streams(inputs["text_pos"], inputs["vis_pos"], inputs["text_valid"],
                    inputs["vis_valid"])
  b, n = v.shape[:2]
  kv_shape = (b, n, cfg.text.num_kv_heads, cfg.text.head_dim)
  zeros = lambda count: jnp.zeros((count, *kv_shape), t.dtype)  # noqa: E731
  ca_module = _layer_tables(cfg, np.zeros(cfg.num_layers, bool))["ca_module"]  # budget-free
  carry = (t, v, zeros(num_sa), zeros(num_sa), zeros(num_ca), zeros(num_ca))
  text_k, text_v = [], []
  for l in range(cfg.num_layers):
    layer = dec.layers[l]
    cross = None if not num_ca else (lambda m=int(ca_module[l]): dec.cross[m])
    bit, is_ca = tables["bits"][l], tables["is_ca"][l]
    ca_slot, sa_slot = tables["ca_slot"][l], tables["sa_slot"][l]

    def sa(c, layer=layer, cross=cross, sa_slot=sa_slot):
      t, v, vk, vv, ck, cv = c
      t, v, kv = visor_layer(layer, cross, t, v, streams, sa=True, ca=False,
                             impl=cfg.attention_impl)
      return (t, v, vk.at[sa_slot].set(kv.vis[0]), vv.at[sa_slot].set(kv.vis[1]), ck, cv), kv.text

    def text(c, layer=layer, cross=cross, is_ca=is_ca, ca_slot=ca_slot):
      t, v, vk, vv, ck, cv = c
      t, v, kv = visor_layer(layer, cross, t, v, streams, sa=False, ca=is_ca,
                             impl=cfg.attention_impl)
      if num_ca:  # a layer that did not cross-attend leaves the CA caches as they were
        ck = ck.at[ca_slot].set(jnp.where(is_ca, kv.ca[0], ck[ca_slot]))
        cv = cv.at[ca_slot].set(jnp.where(is_ca, kv.ca[1], cv[ca_slot]))
      return (t, v, vk, vv, ck, cv), kv.text

    # static: no layer of this budget self-attends (and empty caches)
    carry, (k, val) = text(carry) if not num_sa else jax.lax.cond(bit, sa, text, carry)
    text_k.append(k)
    text_v.append(val)
  t, _, vk, vv, ck, cv = carry
  pad = ((0, 0), (0, max_len - text_k[0].shape[1]), (0, 0), (0, 0))
  # One array per layer: decode_step reads (and updates) each layer's own.
  cache = dict(text_k=[jnp.pad(k, pad) for k in text_k], text_v=[jnp.pad(v, pad) for v in text_v],
               vis_k=list(vk), vis_v=list(vv), ca_k=list(ck), ca_v=list(cv))
  last = t[jnp.arange(b), last_prompt_index(streams.text_valid)]
  return model.logits(dec.norm(last)[:, None])[:, 0], cache


def decode_step(model: LlavaOnevision, token: Array, pos: Array, index: Array, cache: dict,
                vis_pos: Array, vis_valid: Array, row: tuple[bool, ...]):
  """One new token per sample → (logits float32[B, V], updated cache).

  model: the per-layer serving layout (`visor.serving_layout`). token int32[B]; pos int32[B] its
  position in the original sequence; index int32[B] its slot in the text cache (= number of
  text tokens before it). `row` is the group's budget (static: one program per budget), so
  each layer's path (SA, CA + text, text) is chosen at trace time.

  The layers are unrolled, each reading its own weights and its own cache arrays: a step
  reads every weight once and copies none. (A scan over stacked weights copied each layer's
  slice out first, on every token: twice the time at 0.5B widths.)
  """
  dec, cfg = model.decoder, model.cfg
  _check_per_layer(dec)
  tables = _layer_tables(cfg, np.asarray(row, bool))
  x = model.embed[...][token][:, None].astype(model.dtype)
  b, t_max = cache["text_k"][0].shape[:2]
  streams = Streams(pos[:, None], vis_pos, jnp.ones((b, 1), bool), vis_valid)
  past_text = jnp.arange(t_max)[None, :] < index[:, None]           # bool[B, T_max]
  rows = jnp.arange(b)
  text_k, text_v = list(cache["text_k"]), list(cache["text_v"])
  for l in range(cfg.num_layers):
    sa, ca = bool(tables["bits"][l]), bool(tables["is_ca"][l])
    sa_slot, ca_slot = int(tables["sa_slot"][l]), int(tables["ca_slot"][l])
    past = Past(text=(text_k[l], text_v[l]), text_valid=past_text,
                vis=(cache["vis_k"][sa_slot], cache["vis_v"][sa_slot]) if sa else None,
                ca=(cache["ca_k"][ca_slot], cache["ca_v"][ca_slot]) if ca else None)
    cross = lambda m=int(tables["ca_module"][l]): dec.cross[m]  # noqa: E731
    x, _, kv = visor_layer(dec.layers[l], cross, x, None, streams, sa=sa, ca=ca,
                           impl=cfg.attention_impl, past=past)
    text_k[l] = text_k[l].at[rows, index].set(kv.text[0][:, 0])
    text_v[l] = text_v[l].at[rows, index].set(kv.text[1][:, 0])
  return model.logits(dec.norm(x))[:, 0], {**cache, "text_k": text_k, "text_v": text_v}


def _check_per_layer(dec) -> None:
  if not isinstance(dec.layers, nnx.List):
    raise ValueError("prefill/decode_step read the per-layer serving layout: pass "
                     "visor.serving_layout(model) (the `Generator` does).")


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
  decode_seconds: np.ndarray  # float64[B] wall time of its group's decode steps (after prefill)
  decode_steps: np.ndarray    # int32[B] decode steps its group ran


class Generator:
  """Compiled prefill/decode for one model; `generate` groups requests by budget."""

  def __init__(self, model: LlavaOnevision):
    self.cfg = model.cfg
    # The serving layout (`visor.serving_layout`): every layer loop below reads each weight in
    # place. Its layer weights are a copy, made once here.
    self.graphdef, self.state = nnx.split(visor.serving_layout(model))
    merge = lambda st: nnx.merge(self.graphdef, st)  # noqa: E731
    self._route = jax.jit(lambda st, x, th: merge(st).route(x, th))
    self._visual = jax.jit(lambda st, x: merge(st).visual_tokens(
        x["pixels"], x["vis_src"], x["vis_weight"], x["vis_newline"]))
    self._prefill = jax.jit(
        lambda st, x, vis, tables, num_sa, num_ca, max_len: prefill(
            merge(st), x, vis, tables, num_sa=num_sa, num_ca=num_ca, max_len=max_len),
        static_argnums=(4, 5, 6))
    self._decode = jax.jit(lambda st, *args: decode_step(merge(st), *args),
                           donate_argnums=(4,), static_argnums=(7,))

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
                     budget, np.zeros(b, np.int64), np.zeros(b), np.zeros(b, np.int32))
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
    out.cache_bytes[idx] = sum(int(c.nbytes) for c in jax.tree.leaves(cache)) // padded
    last_pos = np.maximum(x["text_pos"][np.arange(padded), text_len - 1],
                          np.max(np.where(x["vis_valid"], x["vis_pos"], -1), axis=1))
    pos, index = last_pos + 1, text_len.copy()
    done = np.zeros(padded, bool)
    done[n:] = True  # padding rows: computed, never recorded
    stop = np.asarray(list(stop_ids), np.int32)
    logits = jax.block_until_ready(logits)
    start, steps = time.perf_counter(), 0
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
                                   x["vis_valid"], tuple(bool(b) for b in row))
      pos, index, steps = pos + 1, index + 1, steps + 1
    jax.block_until_ready(logits)
    out.decode_seconds[idx], out.decode_steps[idx] = time.perf_counter() - start, steps


def generate(model: LlavaOnevision, inputs: Mapping[str, np.ndarray], **kwargs) -> Generation:
  """One-off `Generator(model).generate(...)`; keep a `Generator` to reuse its compilations."""
  return Generator(model).generate(inputs, **kwargs)
