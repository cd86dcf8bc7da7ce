"""GPU attention: cuDNN's fused flash kernel (`attention_impl='cudnn'`).

`jax.nn.dot_product_attention(implementation='cudnn')` takes a causal flag and per-sample
sequence lengths without any [T, S] array; given a dense mask instead it would build one. So,
as for splash (`splash_attention.py`), the two cases that map onto it exactly go to the
kernel and everything else to `blockwise_attention` (exact for any mask, no [T, S] array):

  * no mask (SigLIP): the kernel as is;
  * causal SELF-attention (the LLM's text and SA paths, `mask.q_pos is mask.k_pos`): tokens
    sorted by position, valid ones first (`sort_by_position`), so the mask is "causal in
    index order, first n_valid tokens" = `is_causal` with `query_seq_lengths` and
    `key_value_seq_lengths`; the output is unsorted back.

cuDNN computes in bfloat16/float16 only (`config_lib` refuses 'cudnn' with float32 compute),
on NVIDIA GPUs. Without one the kernel cannot run here; the tests run this same wrapper with
`jax.nn.dot_product_attention`'s 'xla' implementation of the same arguments (`KERNEL`), which
checks everything but the kernel itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from visor_jax.models.splash_attention import sort_by_position, unsort, use_splash

Array = jax.Array
KERNEL = "cudnn"  # jax.nn.dot_product_attention's implementation (tests: 'xla', same arguments)


def use_cudnn(mask) -> bool:
  """Whether `mask` (an `nn.Mask`, a dense array or None) is a case the kernel computes
  exactly: the same cases as splash."""
  return use_splash(mask)


def cudnn_attention(q: Array, k: Array, v: Array, mask) -> Array:
  """q: float[B, T, N, H]; k, v: float[B, T, K, H]; mask: None or a causal `nn.Mask` whose
  q_pos is its k_pos (`use_cudnn`). → float[B, T, N, H]; rows of invalid queries are padding."""
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=KERNEL)
  if k.shape[1] != q.shape[1] or not use_cudnn(mask):
    raise ValueError("cudnn_attention: self-attention with no mask or a causal nn.Mask whose "
                     "q_pos is its k_pos (use_cudnn); got another case.")
  order, valid, (q, k, v) = sort_by_position(mask, q, k, v)
  lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=KERNEL)
  return unsort(out, order)
