"""Training-free visual-token reduction inside the same model: FastV, PyramidDrop, a
VisionZip-style merge, and VISOR-TR.

The peers (FastV, PyramidDrop, VisionZip-style) run on the all-SA base: every LLM layer
self-attends over [visual; text], exactly `model(inputs, budgets.all_sa(cfg))`, except that from
some point on only a subset of the visual tokens takes part. VISOR-TR pools the visual tokens
before VISOR's decoder and then runs VISOR at any budget. docs/token_reduction.md says what each
method does here and where it departs from its paper.

How tokens are dropped. Dropping is masking: a dropped visual token's validity turns False from
the layer where it is dropped on, so no query ever attends to it again and the outputs are those
of true dropping; kept tokens keep their original positions (RoPE and the causal mask use
positions, not array order). To make the compute honest, the kept tokens are then *gathered*
into a smaller array of static size (`gather=True`, the default): after a drop to fraction
`keep` of N padded visual tokens the array holds `keep_count(N, keep)` slots (ceil, at least 1),
which bounds every sample's own kept count, so shapes stay static under `jax.jit`. Gathering
changes nothing but the array order of the visual stream (tested against `gather=False`).

Which token ranks. "The last text token" is the last valid text token of each sample, or
`rank_index` int32[B] when given: generation without a KV cache re-runs the forward on the
growing sequence and passes the last *prompt* token, so the ranking (hence the kept set) is the
one a cached implementation would fix at prefill.

Structure. The peers' forward is a Python loop over the LLM layers (unrolled), each layer the
model's own module (`nnx.split` of the stacked layer parameters, indexed per layer, as
`VisorDecoder.run_layers(unroll=True)` does). VISOR-TR calls `run_layers` itself, so its budget
stays data (one compiled program for every budget) unless `unroll=True` (the FLOPs cross-check).
The existing forward, `run_layers` and generation are untouched.

    out = reduced_forward(model, inputs, Reduction("fastv", keep=0.5))
    out.logits     float32[B, T, V]
    out.kept       int32[B, L]   valid visual tokens each layer attends over (for FLOPs)
    out.survived   bool[B, N]    original visual token still present, as itself, at the end
"""
from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visor_jax.config_lib import ModelConfig
from visor_jax.models.llava_onevision import validate_inputs
from visor_jax.models.nn import Mask, causal_mask, rope
from visor_jax.models.router import last_prompt_index

Array = jax.Array
METHODS = ("none", "fastv", "pyramiddrop", "visionzip", "visor_tr")
NAMES = {"none": "none", "fastv": "FastV", "pyramiddrop": "PyramidDrop",
         "visionzip": "VisionZip-style", "visor_tr": "VISOR-TR"}
# VisionZip's default split of 64 kept tokens: 54 dominant + 10 contextual.
VISIONZIP_CONTEXTUAL = 10 / 64


@dataclasses.dataclass(frozen=True)
class Reduction:
  """A token-reduction setting (hashable: a static argument of a jitted forward).

  method       one of METHODS
  keep         fraction of the visual tokens kept (0, 1]; 1 is an exact no-op for every method
  layer        FastV's K: rank by layer K-1's attention, drop from layer K on (paper: 2)
  stages       PyramidDrop's boundaries b (rank with layer b's norm/q/k, drop before layer b);
               () → round(L/4), round(L/2), round(3L/4), deduplicated, within [1, L). `keep`
               applies at each boundary, so it compounds
  contextual   VisionZip-style: share of the kept tokens that are contextual (merged) tokens
  """
  method: str = "none"
  keep: float = 1.0
  layer: int = 2
  stages: tuple[int, ...] = ()
  contextual: float = VISIONZIP_CONTEXTUAL

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"reduction method {self.method!r} is not one of {METHODS}.")
    if not 0 < self.keep <= 1:
      raise ValueError(f"reduction keep={self.keep}: expected a fraction in (0, 1].")
    if self.method == "visor_tr":
      factor = 1 / self.keep
      if abs(factor - round(factor)) > 1e-6:
        raise ValueError(f"VISOR-TR pools groups of 1/keep tokens: keep={self.keep} is not "
                         "1/k (use 0.5 for 2x, 0.25 for 4x).")
    if not 0 < self.contextual < 1:
      raise ValueError(f"contextual={self.contextual}: expected a fraction in (0, 1).")
    object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))

  @property
  def label(self) -> str:
    """'FastV 50%', 'VISOR-TR 25%' (table rows, result files)."""
    return NAMES[self.method] if self.method == "none" else f"{NAMES[self.method]} {self.keep:.0%}"

  @property
  def pool_factor(self) -> int:
    """VISOR-TR: consecutive tokens of a row pooled into one."""
    return int(round(1 / self.keep))

  def stage_layers(self, num_layers: int) -> tuple[int, ...]:
    """PyramidDrop's boundaries for an L-layer LLM."""
    if self.stages:
      return tuple(sorted(set(self.stages)))
    return tuple(sorted({int(num_layers * f + 0.5) for f in (0.25, 0.5, 0.75)}
                        & set(range(1, num_layers))))

  def check(self, cfg: ModelConfig) -> None:
    n = cfg.num_layers
    if self.method == "fastv" and not 1 <= self.layer < n:
      raise ValueError(f"FastV layer K={self.layer}: expected 1 <= K < {n}.")
    if self.method == "pyramiddrop":
      bad = [s for s in self.stage_layers(n) if not 1 <= s < n]
      if bad or not self.stage_layers(n):
        raise ValueError(f"PyramidDrop stages {self.stages}: expected boundaries in [1, {n}).")


def parse(spec: str) -> list[Reduction]:
  """'fastv:0.5,pyramiddrop:0.5,visionzip:0.25,visor_tr:0.5' → Reductions (the --reduction flag).
  A bare 'fastv' keeps 50%."""
  out = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    method, _, keep = part.partition(":")
    try:
      out.append(Reduction(method.strip().lower(), float(keep) if keep else 0.5))
    except ValueError as e:
      raise ValueError(f"--reduction={spec!r}: {part!r}: {e}") from None
  return out


# ---------------------------------------------------------------------------------------------
# Counts (host and device share one integer formula: no float-ceil surprises at 7k tokens).

def _fraction(x: float) -> tuple[int, int]:
  f = fractions.Fraction(x).limit_denominator(10_000)
  return f.numerator, f.denominator


def keep_count(n: int, keep: float) -> int:
  """ceil(keep * n), at least 1 when n > 0 (0 when there is no visual token)."""
  num, den = _fraction(keep)
  return max(1, -(-n * num // den)) if n > 0 else 0


def _keep_count(n: Array, keep: float) -> Array:
  num, den = _fraction(keep)
  return jnp.where(n > 0, jnp.maximum((n * num + den - 1) // den, 1), 0).astype(jnp.int32)


def contextual_count(kept: int, n: int | None, share: float) -> int:
  """VisionZip-style contextual tokens among `kept` of `n` (None: the static bound, n > kept):
  none when nothing is dropped or kept < 2, else round(share * kept) within [1, kept - 1]."""
  if (n is not None and kept >= n) or kept < 2:
    return 0
  num, den = _fraction(share)
  return min(max((2 * kept * num + den) // (2 * den), 1), kept - 1)


def _contextual_count(kept: Array, n: Array, share: float) -> Array:
  num, den = _fraction(share)
  c = jnp.clip((2 * kept * num + den) // (2 * den), 1, jnp.maximum(kept - 1, 1))
  return jnp.where((kept >= n) | (kept < 2), 0, c).astype(jnp.int32)


def kept_counts(cfg: ModelConfig, reduction: Reduction, num_visual: int) -> list[int]:
  """The method's promise: valid visual tokens at each layer for a sample with `num_visual`.

  VISOR-TR's count depends on the image's row layout: take it from `reduced_forward`'s `kept`
  (or `pooled_count`)."""
  n, num_layers, r = num_visual, cfg.num_layers, reduction
  r.check(cfg)
  if r.method == "none":
    return [n] * num_layers
  if r.method == "fastv":
    return [n] * r.layer + [keep_count(n, r.keep)] * (num_layers - r.layer)
  if r.method == "visionzip":
    return [keep_count(n, r.keep)] * num_layers
  if r.method == "pyramiddrop":
    out, cur, stages = [], n, set(r.stage_layers(num_layers))
    for layer in range(num_layers):
      cur = keep_count(cur, r.keep) if layer in stages else cur
      out.append(cur)
    return out
  raise ValueError("kept_counts: VISOR-TR's count depends on the row layout; use the forward's "
                   "`kept` or `pooled_count`.")


# ---------------------------------------------------------------------------------------------
# Pieces.

class ReducedOutput(NamedTuple):
  logits: Array     # float32[B, T, V]
  kept: Array       # int32[B, L]: valid visual tokens each layer attends over
  survived: Array   # bool[B, N]: original visual token present, unmerged, after the last drop


class _Vis(NamedTuple):
  """The visual stream with its bookkeeping (all [B, n] but v [B, n, D])."""
  v: Array
  pos: Array
  valid: Array
  orig: Array   # index of the slot's token in the original packed sequence
  pure: Array   # the slot holds its original token (not a merge / pool)


def _apply(s: _Vis, selected: Array, v: Array, pure: Array, capacity: int | None) -> _Vis:
  """Keeps the `selected` slots: masks the rest (capacity None) or gathers the selected slots,
  in their original order, into `capacity` slots (>= every sample's selected count)."""
  if capacity is None:
    return s._replace(v=v, valid=selected, pure=pure)
  n = selected.shape[1]
  idx = jnp.arange(n)
  order = jnp.argsort(jnp.where(selected, idx, n + idx), axis=1)[:, :capacity]
  take = lambda a: jnp.take_along_axis(a, order, axis=1)
  return _Vis(jnp.take_along_axis(v, order[..., None], axis=1), take(s.pos), take(selected),
              take(s.orig), take(pure))


def _top(scores: Array, valid: Array, kept: Array) -> Array:
  """bool[B, n]: each sample's `kept` highest-scoring valid tokens (ties: lower index)."""
  s = jnp.where(valid, scores, -1.0)  # attention weights are >= 0
  order = jnp.argsort(-s, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)
  return (rank < kept[:, None]) & valid


def _attention_weights(q: Array, k: Array, mask: Array) -> Array:
  """Softmax attention weights, mean over heads: q [B, Q, N, H], k [B, S, K, H] (grouped-query,
  as `nn.attention`), mask bool[B, 1, Q, S] → float32[B, Q, S]."""
  b, nq, nh, h = q.shape
  kh = k.shape[2]
  q = q.reshape(b, nq, kh, nh // kh, h)
  logits = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, :, None], logits / math.sqrt(h), -1e30)
  return jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))


def _keys(attn, h: Array, pos: Array) -> tuple[Array, Array]:
  """A layer's keys without its values: (pre-RoPE k, rotated k), each float[B, S, K, H]."""
  k = attn.k_proj(h).reshape(*h.shape[:2], attn.k, attn.h)
  return k, rope(k, pos, attn.theta)


def _gather_rows(x: Array, idx: Array) -> Array:
  """x[b, idx[b]] for x [B, S, ...] → [B, 1, ...]."""
  return x[jnp.arange(x.shape[0]), idx][:, None]


def _row_groups(cfg: ModelConfig, vis_pos: Array, newline: Array, valid: Array, factor: int
                ) -> Array:
  """VISOR-TR's pooling groups: bool[B, N], True where a group starts.

  Rows follow the AnyRes layout (data/anyres.py): an image starts where positions jump; its
  first `num_patches` tokens are the base view, `grid` per row; after that each row ends with a
  newline token. Within a row, runs of `factor` consecutive tokens form a group (the last one may
  be shorter); a newline is a group of its own (it marks the row, it is not content)."""
  n = jnp.arange(vis_pos.shape[1])[None]
  prev_pos = jnp.pad(vis_pos[:, :-1], ((0, 0), (1, 0)), constant_values=-2)
  prev_nl = jnp.pad(newline[:, :-1], ((0, 0), (1, 0)))
  img_start = vis_pos != prev_pos + 1
  j = n - jax.lax.cummax(jnp.where(img_start, n, 0), axis=1)  # index within the image
  base, width = cfg.vision.num_patches, cfg.vision.grid
  row_start = img_start | prev_nl | ((j < base) & (j % width == 0)) | (j == base)
  k = n - jax.lax.cummax(jnp.where(row_start, n, 0), axis=1)  # index within the row
  return (row_start | newline | (k % factor == 0)) & valid


def _pool_rows(cfg: ModelConfig, s: _Vis, newline: Array, factor: int
               ) -> tuple[Array, Array, Array]:
  """(values with each group's mean at its first token, group starts, pure) — pure where the
  group has one token (its mean is the token itself)."""
  starts = _row_groups(cfg, s.pos, newline, s.valid, factor)
  gid = jnp.cumsum(starts, axis=1) - 1
  gid = jnp.where(s.valid, jnp.maximum(gid, 0), 0)
  w = s.valid.astype(s.v.dtype)
  segsum = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=s.v.shape[1]))
  sums = segsum(s.v * w[..., None], gid)
  counts = segsum(w, gid)
  take = lambda a: jnp.take_along_axis(a, gid, axis=1)
  mean = jnp.take_along_axis(sums, gid[..., None], axis=1) / jnp.maximum(take(counts), 1)[..., None]
  return jnp.where(starts[..., None], mean, s.v), starts, take(counts) == 1


def pooled_count(cfg: ModelConfig, newline: np.ndarray, vis_pos: np.ndarray,
                 reduction: Reduction, valid: np.ndarray | None = None) -> np.ndarray:
  """VISOR-TR's kept count per sample (host side), int[B], for one sample's [N] arrays or a
  padded batch's [B, N] (with `valid`): `reduced_forward`'s `kept` without running the model."""
  newline = np.atleast_2d(np.asarray(newline, bool))
  vis_pos = np.atleast_2d(np.asarray(vis_pos, np.int32))
  valid = np.ones_like(newline) if valid is None else np.atleast_2d(np.asarray(valid, bool))
  return np.asarray(_row_groups(cfg, jnp.asarray(vis_pos), jnp.asarray(newline),
                                jnp.asarray(valid), reduction.pool_factor).sum(axis=1))


def visor_tr_capacity(cfg: ModelConfig, inputs: Mapping[str, np.ndarray], reduction: Reduction,
                      multiple: int = 1) -> int:
  """Static slots VISOR-TR's gather needs for a concrete batch: the largest kept count, rounded
  up to `multiple` (so a stream of batches reuses compiled programs), at most N."""
  valid = np.asarray(inputs["vis_valid"], bool)
  starts = _row_groups(cfg, jnp.asarray(inputs["vis_pos"]), jnp.asarray(inputs["vis_newline"]),
                       jnp.asarray(valid), reduction.pool_factor)
  most = max(int(np.asarray(starts.sum(axis=1)).max(initial=0)), 1)
  return min(-(-most // multiple) * multiple, valid.shape[1])


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


# ---------------------------------------------------------------------------------------------
# Ranking.

def _fastv_scores(layer, x: Array, k: Array, all_pos: Array, all_valid: Array, q_idx: Array,
                  q_pos: Array) -> Array:
  """Attention the ranking token paid every key in `layer` (k: the layer's keys) → [B, S]."""
  q = layer.attn.project_q(layer.input_norm(_gather_rows(x, q_idx)), q_pos[:, None])
  return _attention_weights(q, k, causal_mask(q_pos[:, None], all_pos, all_valid))[:, 0]


def _pyramid_scores(layer, x: Array, all_pos: Array, all_valid: Array, q_idx: Array,
                    q_pos: Array) -> Array:
  """The ranking token's attention with the NEXT layer's input norm, q/k and RoPE → [B, S]."""
  h = layer.input_norm(x)
  _, k = _keys(layer.attn, h, all_pos)
  q = layer.attn.project_q(_gather_rows(h, q_idx), q_pos[:, None])
  return _attention_weights(q, k, causal_mask(q_pos[:, None], all_pos, all_valid))[:, 0]


def _visionzip(layer, s: _Vis, t: Array, text_pos: Array, text_valid: Array, rank: Array,
               reduction: Reduction, capacity: int | None) -> _Vis:
  """Dominant tokens by the attention received in the first LLM layer (mean over heads and the
  prompt's text queries); the rest merged by key similarity into contextual tokens."""
  nv = s.v.shape[1]
  all_pos = jnp.concatenate([s.pos, text_pos], axis=1)
  all_valid = jnp.concatenate([s.valid, text_valid], axis=1)
  h = layer.input_norm(jnp.concatenate([s.v, t], axis=1))
  k_raw, k = _keys(layer.attn, h, all_pos)
  q = layer.attn.project_q(h[:, nv:], text_pos)
  w = _attention_weights(q, k, causal_mask(text_pos, all_pos, all_valid))        # [B, T, S]
  asks = (text_valid & (jnp.arange(t.shape[1])[None] <= rank[:, None])).astype(jnp.float32)
  scores = jnp.einsum("bt,bts->bs", asks, w)[:, :nv] / jnp.maximum(asks.sum(1), 1)[:, None]

  n = s.valid.sum(axis=1).astype(jnp.int32)
  kept = _keep_count(n, reduction.keep)
  ctx = _contextual_count(kept, n, reduction.contextual)
  dominant = _top(scores, s.valid, kept - ctx)
  c_static = (0 if reduction.keep == 1 else
              contextual_count(keep_count(nv, reduction.keep), None, reduction.contextual))
  if c_static == 0:
    return _apply(s, dominant, s.v, s.pure, capacity)

  # Targets: evenly spaced among the remaining tokens (VisionZip's arange(0, R, R // C)[:C]).
  # A sample without contextual slots (kept < 2) merges nothing: its other tokens just drop.
  rest = s.valid & ~dominant & (ctx > 0)[:, None]
  order = jnp.cumsum(rest, axis=1) - 1
  step = jnp.maximum((n - (kept - ctx)) // jnp.maximum(ctx, 1), 1)[:, None]
  target = rest & (order % step == 0) & (order // step < ctx[:, None])
  slot = jnp.where(target, order // step, 0)
  idx = jnp.arange(nv)
  target_at = jnp.argsort(jnp.where(target, slot * nv + idx, nv * nv + idx),
                          axis=1)[:, :c_static]                                  # [B, C]
  slot_ok = jnp.arange(c_static)[None] < ctx[:, None]
  metric = k_raw[:, :nv].mean(axis=2).astype(jnp.float32)                        # [B, N, H]
  metric = metric / jnp.maximum(jnp.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
  sim = jnp.einsum("bnh,bch->bnc", metric, jnp.take_along_axis(metric, target_at[..., None], 1))
  assign = jnp.argmax(jnp.where(slot_ok[:, None], sim, -jnp.inf), axis=-1)
  assign = jnp.where(target, slot, assign)
  member = jax.nn.one_hot(assign, c_static, dtype=s.v.dtype) * rest[..., None].astype(s.v.dtype)
  mean = (jnp.einsum("bnc,bnd->bcd", member, s.v)
          / jnp.maximum(member.sum(axis=1), 1)[..., None])                        # [B, C, D]
  first = jnp.min(jnp.where(member > 0, idx[None, :, None], nv), axis=1)          # [B, C]
  is_first = rest & (jnp.take_along_axis(first, assign, axis=1) == idx[None])
  v = jnp.where(is_first[..., None], jnp.take_along_axis(mean, assign[..., None], axis=1), s.v)
  return _apply(s, dominant | is_first, v, s.pure & ~is_first, capacity)


# ---------------------------------------------------------------------------------------------
# The forward.

def reduced_forward(model, inputs: Mapping[str, Array], reduction: Reduction,
                    budget: Array | None = None, *, rank_index: Array | None = None,
                    gather: bool = True, capacity: int | None = None, unroll: bool = False
                    ) -> ReducedOutput:
  """The model's forward with `reduction` (see the module doc) → ReducedOutput.

  budget: the peers run on the all-SA base (None, or a concrete all-SA mask); VISOR-TR needs a
  bool[B, L] budget and runs VISOR at it (`unroll=True` with a concrete budget: the per-budget
  program of the FLOPs cross-check). rank_index: int32[B] text index of the ranking token
  (default: the last valid one). gather: shrink arrays at each drop (False: mask only).
  capacity: VISOR-TR's static slot count (default: computed from concrete inputs, N when
  traced: see `visor_tr_capacity`). Jit with the reduction static, e.g.
  `jax.jit(lambda st, x: reduced_forward(nnx.merge(graphdef, st), x, reduction))`.
  """
  cfg = model.cfg
  reduction.check(cfg)
  validate_inputs(cfg, inputs, budget)
  if reduction.method == "visor_tr" and budget is None:
    raise ValueError("VISOR-TR runs VISOR at a budget: pass a bool[B, L] budget.")
  if reduction.method != "visor_tr" and budget is not None and not (
      _is_concrete(budget) and np.asarray(budget, bool).all()):
    raise ValueError(f"{NAMES[reduction.method]} runs on the all-SA base: budget must be None "
                     "or a concrete all-SA mask (budgets.all_sa).")
  dec = model.decoder
  num_layers = cfg.num_layers
  text, vis = model.streams(inputs)
  text_pos, text_valid = inputs["text_pos"], inputs["text_valid"]
  vis_valid = inputs["vis_valid"]
  if dec.pos_conv is not None:
    vis = dec.pos_conv(vis, vis_valid)
  b, n_vis = vis_valid.shape
  rank = (last_prompt_index(text_valid) if rank_index is None
          else jnp.asarray(rank_index, jnp.int32).reshape(b))
  rank_pos = jnp.take_along_axis(text_pos, rank[:, None], axis=1)[:, 0]
  s = _Vis(vis, inputs["vis_pos"], vis_valid, jnp.broadcast_to(jnp.arange(n_vis), (b, n_vis)),
           jnp.ones((b, n_vis), bool))

  def survived(s: _Vis) -> Array:
    hit = jnp.zeros((b, n_vis), jnp.int32).at[jnp.arange(b)[:, None], s.orig].max(
        (s.valid & s.pure).astype(jnp.int32))
    return hit > 0

  if reduction.method == "visor_tr":
    if gather and capacity is None:
      capacity = (visor_tr_capacity(cfg, inputs, reduction)
                  if _is_concrete(inputs["vis_pos"], inputs["vis_newline"], vis_valid) else n_vis)
    v, starts, pure = _pool_rows(cfg, s, inputs["vis_newline"], reduction.pool_factor)
    s = _apply(s, starts, v, pure, capacity if gather else None)
    text, _ = dec.run_layers(text, s.v, text_pos, s.pos, text_valid, s.valid, budget, 0,
                             num_layers, unroll=unroll)
    kept = jnp.broadcast_to(s.valid.sum(axis=1, dtype=jnp.int32)[:, None], (b, num_layers))
    return ReducedOutput(model.logits(dec.norm(text)), kept, survived(s))

  cap = lambda n: keep_count(n, reduction.keep) if gather else None
  layer_def, layer_state = nnx.split(dec.layers)
  layer_at = lambda l: nnx.merge(layer_def, jax.tree.map(lambda a: a[l], layer_state))
  stages = set(reduction.stage_layers(num_layers)) if reduction.method == "pyramiddrop" else ()
  if reduction.method == "visionzip":
    s = _visionzip(layer_at(0), s, text, text_pos, text_valid, rank, reduction, cap(n_vis))
  kept = []
  for l in range(num_layers):
    layer = layer_at(l)
    nv = s.v.shape[1]
    all_pos = jnp.concatenate([s.pos, text_pos], axis=1)
    all_valid = jnp.concatenate([s.valid, text_valid], axis=1)
    x = jnp.concatenate([s.v, text], axis=1)
    if l in stages:
      scores = _pyramid_scores(layer, x, all_pos, all_valid, nv + rank, rank_pos)[:, :nv]
      n_keep = _keep_count(s.valid.sum(axis=1, dtype=jnp.int32), reduction.keep)
      s = _apply(s, _top(scores, s.valid, n_keep), s.v, s.pure, cap(nv))
      nv = s.v.shape[1]
      all_pos = jnp.concatenate([s.pos, text_pos], axis=1)
      all_valid = jnp.concatenate([s.valid, text_valid], axis=1)
      x = jnp.concatenate([s.v, text], axis=1)
    kept.append(s.valid.sum(axis=1, dtype=jnp.int32))
    # Implicit mask: the blockwise implementation never builds the [S, S] array.
    out, k, _ = layer.with_kv(x, all_pos, Mask(all_valid, all_pos, all_pos, causal=True))
    text = out[:, nv:]
    s = s._replace(v=out[:, :nv])
    if reduction.method == "fastv" and l == reduction.layer - 1:
      scores = _fastv_scores(layer, x, k, all_pos, all_valid, nv + rank, rank_pos)[:, :nv]
      n_keep = _keep_count(s.valid.sum(axis=1, dtype=jnp.int32), reduction.keep)
      s = _apply(s, _top(scores, s.valid, n_keep), s.v, s.pure, cap(nv))
  return ReducedOutput(model.logits(dec.norm(text)), jnp.stack(kept, axis=1), survived(s))


def jit_forward(model, reduction: Reduction, *, gather: bool = True,
                capacity: int | None = None, unroll: bool = False):
  """`f(state, inputs, budget, rank_index) -> ReducedOutput`, jitted with the settings static;
  `state` is `nnx.state(model)` (pass it so one compilation serves any weights)."""
  graphdef = nnx.graphdef(model)
  return jax.jit(lambda state, x, budget, rank_index: reduced_forward(
      nnx.merge(graphdef, state), x, reduction, budget, rank_index=rank_index, gather=gather,
      capacity=capacity, unroll=unroll))


# ---------------------------------------------------------------------------------------------
# Evidence tables.

def answer_token_survival(kept, answer_token_index):
  """Did the answer-bearing visual token survive the reduction?

  kept: bool[N] / bool[B, N] (e.g. `ReducedOutput.survived`) or a 1-D sequence of kept indices;
  answer_token_index: int (or int[B] with a [B, N] mask) into the original packed visual
  sequence. Returns bool (or bool[B]). A rate is the mean over samples.
  """
  idx = np.asarray(answer_token_index)
  if not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"answer_token_index: expected integers, got {answer_token_index!r}.")
  arr = np.asarray(kept)
  if arr.dtype == bool:
    if arr.ndim == 1 and idx.ndim == 0:
      if not 0 <= idx < arr.shape[0]:
        raise ValueError(f"answer_token_index {int(idx)} is outside [0, {arr.shape[0]}).")
      return bool(arr[idx])
    if arr.ndim == 2 and idx.shape == (arr.shape[0],):
      if np.any((idx < 0) | (idx >= arr.shape[1])):
        raise ValueError(f"answer_token_index {idx.tolist()} is outside [0, {arr.shape[1]}).")
      return arr[np.arange(arr.shape[0]), idx]
    raise ValueError(f"kept mask of shape {arr.shape} does not fit answer_token_index of shape "
                     f"{idx.shape}.")
  if arr.ndim != 1 or idx.ndim != 0 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise ValueError("kept indices: expected a 1-D integer sequence and one answer index.")
  if idx < 0:
    raise ValueError(f"answer_token_index {int(idx)} is negative.")
  return bool(np.isin(idx, arr))
