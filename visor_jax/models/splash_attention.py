"""TPU attention: JAX's Pallas splash-attention kernel (`attention_impl='splash'`).

Splash (jax.experimental.pallas.ops.tpu.splash_attention) is the flash-style TPU kernel that
MaxText uses: block-sparse over a *static* mask, per-sample padding through segment ids, its own
recomputing backward. Off TPU it runs in Pallas interpret mode (exact, slow: for tests).

Our masks are per sample and positional (`nn.Mask`: key j is visible to query i iff valid and
k_pos[j] <= q_pos[i]), which a static mask cannot say in general. Two cases map onto it exactly:

  * no mask (SigLIP): `FullMask`; the sequence padded to a block multiple, the padding given
    its own segment id;
  * causal SELF-attention (the LLM's text and SA paths: queries and keys are one sequence,
    `mask.q_pos is mask.k_pos`): each sample's tokens are sorted by position (invalid ones
    last, in their own segment), so "position <= mine" becomes "index <= mine", a
    `CausalMask`; the output is unsorted back. Exact when the valid tokens' positions are
    distinct (LLaVA-OV's are: one position per token of the interleaved sequence). The
    sorts are O(T) gathers, the kernel never writes a [T, T] array.

Everything else (cross-attention: text queries over visual keys at other positions; decoding
one query against a cache; dense masks) goes to `blockwise_attention`, which is exact for any
mask: `use_splash` says which. Outputs at invalid query rows are padding and differ from the
reference's (which averages whatever those rows may see); callers never read them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BLOCK = 128      # sequences are padded to a multiple of this (splash's smallest block)
MAX_BLOCK = 512  # largest block tried (TPU: bigger blocks, fewer grid steps)
_INT_MAX = np.iinfo(np.int32).max


def use_splash(mask) -> bool:
  """Whether `mask` (an `nn.Mask`, a dense array or None) is a case splash computes exactly."""
  if mask is None:
    return True
  causal = getattr(mask, "causal", None)
  return bool(causal) and mask.q_pos is mask.k_pos


def _block(n: int) -> int:
  """The largest block <= MAX_BLOCK (a power-of-two multiple of BLOCK) dividing n."""
  b = MAX_BLOCK
  while n % b:
    b //= 2
  return b


@functools.lru_cache(maxsize=64)
def _kernel(length: int, groups: int, causal: bool, interpret: bool):
  """One MQA splash kernel: `groups` query heads share one kv head, length x length."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  shape = (length, length)
  mask = sa.MultiHeadMask([sa.CausalMask(shape) if causal else sa.FullMask(shape)] * groups)
  b = _block(length)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  # The mask's block tables are concrete arrays, built once per shape even inside a trace.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                              interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, mask) -> Array:
  """q: float[B, T, N, H]; k, v: float[B, T, K, H] (one sequence: self-attention); mask: None
  or a causal `nn.Mask` whose q_pos is its k_pos (see `use_splash`). → float[B, T, N, H]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if k.shape[1] != t or not use_splash(mask):
    raise ValueError("splash_attention: self-attention with no mask or a causal nn.Mask "
                     "whose q_pos is its k_pos (use_splash); got another case.")
  causal = mask is not None
  if causal:
    order, valid, (q, k, v) = sort_by_position(mask, q, k, v)
    seg = valid.astype(jnp.int32)
  else:
    seg = jnp.ones((b, t), jnp.int32)
  length = -(-t // BLOCK) * BLOCK
  pad = ((0, 0), (0, length - t), (0, 0), (0, 0))
  seg = jnp.pad(seg, ((0, 0), (0, length - t)))  # padding: segment 0, sees only padding
  # [B, K, G, L, H] queries (pre-scaled: splash applies no 1/sqrt(H)), [B, K, L, H] keys/values.
  q = jnp.pad(q * (1.0 / np.sqrt(h)).astype(q.dtype), pad)
  q = q.reshape(b, length, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k, v))
  kernel = _kernel(length, n // kv_heads, causal, jax.default_backend() != "tpu")
  per_head = lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))  # noqa: E731
  out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(q, k, v, seg)  # [B, K, G, L, H]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)[:, :t]
  return unsort(out, order) if causal else out


def sort_by_position(mask, *xs: Array) -> tuple[Array, Array, tuple[Array, ...]]:
  """Causal self-attention in position order: → (order int32[B, T], valid bool[B, T] sorted,
  each x float[B, T, ...] sorted), valid tokens by position first, invalid ones last. Then
  "key position <= query position" is "key index <= query index" for the valid tokens
  (positions distinct). O(T) gathers; `unsort` puts an output back."""
  key = jnp.where(mask.k_valid, mask.k_pos, _INT_MAX)
  order = jnp.argsort(key, axis=1, stable=True)                          # [B, T]
  take = lambda x: jnp.take_along_axis(  # noqa: E731
      x, order.reshape(*order.shape, *([1] * (x.ndim - 2))), axis=1)
  return order, jnp.take_along_axis(mask.k_valid, order, axis=1), tuple(map(take, xs))


def unsort(out: Array, order: Array) -> Array:
  """`sort_by_position`'s inverse on an output float[B, T, ...]."""
  return jnp.zeros_like(out).at[jnp.arange(out.shape[0])[:, None], order].set(out)
