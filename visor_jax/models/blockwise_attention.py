"""Blockwise (flash-style) attention in plain JAX: never a [T, S] score matrix.

Queries are cut into `nq` blocks and keys into `nk` blocks; each query block walks the key
blocks with a running max / running sum (online softmax), so the largest temporary is one
block pair's scores float32[B, K, G, bq, bk]. The backward pass is a `jax.custom_vjp` that
recomputes each block pair's probabilities from the saved log-sum-exp (FlashAttention-2), so
nothing of size [T, S] is saved for it either; differentiating through the scans instead would
stack every block's probabilities, i.e. the whole matrix again.

The mask is given implicitly, made per block from
  k_valid bool[B, S]                      padding of the keys;
  q_pos int32[B, T], k_pos int32[B, S]    with causal=True: key j is visible to query i iff
                                          k_pos[j] <= q_pos[i] (positions, not array order);
  mask bool[B, 1|N, T, S]                 optionally, a dense mask ANDed on top (old callers).
A block pair with no visible entry for any sample is skipped (`lax.cond`), decided at run time
from the block's positions, so correctness never depends on the order of the keys; keys ordered
by position (text after its image, the usual case) just skip more.

Layout: q is moved once to [nq, B, K, G, bq, H] and k, v to [nk, B, K, bk, H] (O(T) copies),
so each block is contiguous and the forward's two block matmuls are plain (B, K)-batched
matmuls with the G query heads sharing a kv head stacked as rows: no per-block transposes and
no repeated k, v for grouped-query attention.

Semantics match `jax.nn.dot_product_attention(implementation='xla')` exactly, including its
handling of a fully masked query row: the reference writes a large negative logit, not -inf, so
such a row gets the *uniform* average of all S values. Outputs there are padding, but matching
them lets tests compare whole arrays and keeps gradients identical.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from visor_jax import sharding

Array = jax.Array

# Block sizes (upper bounds; blocks are balanced, see _split), tuned on the project's 2-core
# x86 CPU. Causal masks: 128 x 128 was fastest for the LLM's SA at T = 1549 (forward and
# backward; 64-1024 tried): small blocks skip more of the upper triangle. Without causality
# nothing can be skipped and small blocks only cost (small matmuls, more loop steps): SigLIP's
# 729 patches were fastest as one block. Accelerators want larger blocks.
Q_BLOCK = 128
K_BLOCK = 128
FULL_BLOCK = 1024  # q and k blocks with neither causality nor a dense mask (nothing to skip)
# The reference's masked logit (jax.nn's _get_large_negative for float32): finite, so a fully
# masked row does not produce NaN; exp(NEG - m) underflows to exactly 0 for any real max m.
NEG = -0.7 * float(np.finfo(np.float32).max)
_INT_MIN, _INT_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


def _split(n: int, block: int) -> tuple[int, int]:
  """(number of blocks, block size) covering n with the least padding: 1549 by 128 → 13 × 120."""
  num = max(1, -(-n // block))
  return num, max(1, -(-n // num))


def _pad(x: Array, axis: int, size: int, value) -> Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _visible(q_pos, k_pos, k_valid, mask, causal: bool) -> Array:
  """One block pair's mask, broadcastable to [B, K, G, bq, bk].

  q_pos int32[B, bq]; k_pos int32[B, bk]; k_valid bool[B, bk]; mask bool[B, K|1, G|1, bq, bk]
  or None.
  """
  vis = k_valid[:, None, :]                                            # [B, 1, bk]
  if causal:
    vis = vis & (k_pos[:, None, :] <= q_pos[:, :, None])               # [B, bq, bk]
  vis = vis[:, None, None]
  return vis if mask is None else vis & mask


def _scores(q, k, vis, scale):
  """float32[B, K, G, bq, bk] masked logits, computed as the reference does (scale, then mask)."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", q, k, preferred_element_type=jnp.float32)
  return jnp.where(vis, s * jnp.float32(scale), NEG)


def _forward(q, k, v, q_pos, k_pos, k_valid, mask, live, causal, scale):
  """Blocked inputs → (out [nq, B, K, G, bq, H] in q's dtype, lse float32[nq, B, K, G, bq]).

  q [nq, B, K, G, bq, H]; k, v [nk, B, K, bk, H]; q_pos int32[nq, B, bq]; k_pos, k_valid
  [nk, B, bk]; mask bool[nq, nk, B, K|1, G|1, bq, bk] or None; live bool[nq, nk].
  """
  row_shape = q.shape[1:-1]                                            # [B, K, G, bq]

  def q_step(_, xs):
    qb, qp, mask_row, live_row = xs

    def k_step(carry, xs):
      kb, vb, kp, kv, mb, is_live = xs

      def compute(carry):
        m, l, acc = carry
        s = _scores(qb, kb, _visible(qp, kp, kv, mb, causal), scale)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(vb.dtype), vb,
                        preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

      return jax.lax.cond(is_live, compute, lambda c: c, carry), None

    init = (jnp.full(row_shape, NEG, jnp.float32), jnp.zeros(row_shape, jnp.float32),
            jnp.zeros(qb.shape, jnp.float32))
    (m, l, acc), _ = jax.lax.scan(k_step, init, (k, v, k_pos, k_valid, mask_row, live_row))
    # l == 0 only when every key block was skipped: a fully masked row, replaced by the caller.
    l = jnp.where(l > 0, l, 1.0)
    return None, ((acc / l[..., None]).astype(qb.dtype), m + jnp.log(l))

  _, (out, lse) = jax.lax.scan(q_step, None, (q, q_pos, mask, live))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _attend(q, k, v, q_pos, k_pos, k_valid, mask, live, causal, scale):
  return _forward(q, k, v, q_pos, k_pos, k_valid, mask, live, causal, scale)[0]


def _attend_fwd(q, k, v, q_pos, k_pos, k_valid, mask, live, causal, scale):
  out, lse = _forward(q, k, v, q_pos, k_pos, k_valid, mask, live, causal, scale)
  return out, (q, k, v, q_pos, k_pos, k_valid, mask, live, out, lse)


def _attend_bwd(causal, scale, res, d_out):
  """FlashAttention-2 backward: key blocks outside, query blocks inside; dq summed over the
  outer loop. p is recomputed from the saved lse, so only one block pair is ever live."""
  q, k, v, q_pos, k_pos, k_valid, mask, live, out, lse = res
  f32 = jnp.float32
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)        # [nq, B, K, G, bq]
  mask_cols = None if mask is None else jnp.swapaxes(mask, 0, 1)

  def k_step(dq, xs):
    kb, vb, kp, kv, mask_col, live_col = xs

    def q_step(carry, xs):
      qb, dob, lse_b, delta_b, qp, mb, is_live = xs

      def compute(carry):
        dk, dv = carry
        s = _scores(qb, kb, _visible(qp, kp, kv, mb, causal), scale)
        p = jnp.exp(s - lse_b[..., None])                              # [B, K, G, bq, bk]
        dv = dv + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(dob.dtype), dob,
                             preferred_element_type=f32)
        dp = jnp.einsum("bkgqh,bksh->bkgqs", dob, vb, preferred_element_type=f32)
        ds = (p * (dp - delta_b[..., None]) * f32(scale)).astype(qb.dtype)
        dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds, qb, preferred_element_type=f32)
        dq_b = jnp.einsum("bkgqs,bksh->bkgqh", ds, kb, preferred_element_type=f32)
        return (dk, dv), dq_b

      def skip(carry):
        return carry, jnp.zeros(qb.shape, f32)

      return jax.lax.cond(is_live, compute, skip, carry)

    init = (jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32))
    (dk, dv), dq_col = jax.lax.scan(q_step, init, (q, d_out, lse, delta, q_pos, mask_col,
                                                   live_col))
    return dq + dq_col, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(k_step, jnp.zeros(q.shape, f32),
                              (k, v, k_pos, k_valid, mask_cols, live.T))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None, None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _live_blocks(q_pos, k_pos, k_valid, mask, causal: bool) -> Array:
  """bool[nq, nk]: block pairs with at least one visible (query, key) entry in some sample.

  From the blocks' extreme positions: a causal pair is live iff the smallest valid key
  position is <= the largest query position. Exact for any key order.
  """
  any_valid = jnp.any(k_valid, axis=-1)                                # [nk, B]
  if causal:
    k_min = jnp.min(jnp.where(k_valid, k_pos, _INT_MAX), axis=-1)      # [nk, B]
    q_max = jnp.max(q_pos, axis=-1)                                    # [nq, B]
    live = jnp.any(k_min[None, :, :] <= q_max[:, None, :], axis=-1)
  else:
    live = jnp.broadcast_to(jnp.any(any_valid, axis=-1)[None, :], (q_pos.shape[0],
                                                                     k_pos.shape[0]))
  if mask is not None:
    live = live & jnp.any(mask, axis=tuple(range(2, mask.ndim)))
  return live


def blockwise_attention(q: Array, k: Array, v: Array, *, q_pos: Array | None = None,
                        k_pos: Array | None = None, k_valid: Array | None = None,
                        causal: bool = False, mask: Array | None = None,
                        q_block: int | None = None, k_block: int | None = None,
                        scale: float | None = None) -> Array:
  """Softmax(q kᵀ · scale, masked) v, blockwise; equal to the 'xla' reference within rounding.

  q: float[B, T, N, H]; k, v: float[B, S, K, H] with N % K == 0 (grouped-query);
  q_pos int32[B, T], k_pos int32[B, S] (needed when causal); k_valid bool[B, S] (default all
  valid); mask bool[B, 1|N, T, S] or None, ANDed with the rest; q_block, k_block: block
  sizes (default: the module's Q_BLOCK, K_BLOCK, or FULL_BLOCK without causality or a dense
  mask, read at trace time; the default key block widens when all queries fit one block).
  → float[B, T, N, H].
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"blockwise_attention: {n} query heads are not a multiple of {kh} kv heads.")
  if causal and (q_pos is None or k_pos is None):
    raise ValueError("blockwise_attention: causal=True needs q_pos and k_pos.")
  g = n // kh
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  k_valid = jnp.ones((b, s), bool) if k_valid is None else k_valid
  q_pos = jnp.zeros((b, t), jnp.int32) if q_pos is None else q_pos.astype(jnp.int32)
  k_pos = jnp.zeros((b, s), jnp.int32) if k_pos is None else k_pos.astype(jnp.int32)
  default_q, default_k = (Q_BLOCK, K_BLOCK) if causal or mask is not None else (FULL_BLOCK,) * 2
  q_block = q_block or default_q
  nq, bq = _split(t, q_block)
  if k_block is None:
    k_block = default_k
    if nq == 1:
      # One query block (CA's 64 text tokens, decoding's one): small key blocks only add loop
      # steps (measured: CA 64 x 4032 backward 114 ms with 256-key blocks, 79 with 1024), so
      # at least FULL_BLOCK keys, more while a block pair holds <= q_block x k_block scores.
      k_block = max(FULL_BLOCK, q_block * default_k // bq)
  nk, bk = _split(s, k_block)
  tp, sp = nq * bq, nk * bk

  # Padded query rows get the smallest position (they never make a block live; their rows are
  # dropped); padded keys are invalid.
  qb = _pad(q, 1, tp, 0).reshape(b, nq, bq, kh, g, h).transpose(1, 0, 3, 4, 2, 5)
  kb = _pad(k, 1, sp, 0).reshape(b, nk, bk, kh, h).transpose(1, 0, 3, 2, 4)
  vb = _pad(v, 1, sp, 0).reshape(b, nk, bk, kh, h).transpose(1, 0, 3, 2, 4)
  qp = _pad(q_pos, 1, tp, _INT_MIN).reshape(b, nq, bq).transpose(1, 0, 2)
  kp = _pad(k_pos, 1, sp, 0).reshape(b, nk, bk).transpose(1, 0, 2)
  kv = _pad(k_valid, 1, sp, False).reshape(b, nk, bk).transpose(1, 0, 2)
  mb = None
  if mask is not None:
    heads = mask.shape[1]
    mb = _pad(_pad(mask, 2, tp, False), 3, sp, False)
    mb = mb.reshape(b, heads, nq, bq, nk, bk).transpose(2, 4, 0, 1, 3, 5)
    mb = mb.reshape(nq, nk, b, *((kh, g) if heads > 1 else (1, 1)), bq, bk)
  live = _live_blocks(qp, kp, kv, mb, causal)
  if sharding.skips_need_collectives():  # every pair computed: see that function
    live = jnp.ones_like(live)

  out = _attend(qb, kb, vb, qp, kp, kv, mb, live, causal, scale)      # [nq, B, K, G, bq, H]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, h)[:, :t]

  # Fully masked rows: the reference's uniform average over all S keys (see module doc).
  has_key = _has_key(q_pos, k_pos, k_valid, mask, causal)              # bool[B, T, 1|N]
  # (With no keys at all, S = 0, the reference's sum over nothing is 0.)
  mean_v = jnp.sum(v.astype(jnp.float32), axis=1) / max(s, 1)
  mean_v = jnp.repeat(mean_v, g, axis=1)                               # [B, N, H]
  return jnp.where(has_key[..., None], out, mean_v[:, None].astype(out.dtype))


def _has_key(q_pos, k_pos, k_valid, mask, causal: bool) -> Array:
  """bool[B, T, 1|N]: the query row sees at least one key (O(T + S) unless a dense mask)."""
  if mask is not None:
    vis = k_valid[:, None, None, :] & mask
    if causal:
      vis = vis & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    return jnp.any(vis, axis=-1).transpose(0, 2, 1)
  if causal:
    k_min = jnp.min(jnp.where(k_valid, k_pos, _INT_MAX), axis=-1, initial=_INT_MAX)  # [B]
    return (q_pos >= k_min[:, None])[..., None]
  return jnp.broadcast_to(jnp.any(k_valid, axis=-1)[:, None, None], (*q_pos.shape, 1))
