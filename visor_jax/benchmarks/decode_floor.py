"""What a decode step cannot beat, and what users would run instead (used by generate_speed).

  * the bandwidth floor: a decode step of batch 1 must read every weight it uses and its KV
    cache once; bytes / the machine's measured read bandwidth (a jitted sum over 1 GiB, the
    best of a few) is the least time it can take;
  * transformers' `generate` with its KV cache (greedy, sdpa, float32, random weights of the
    same geometry), per token: the gaps between successive calls of a logits processor, which
    transformers runs once per generated token, after that token's forward.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

GIB = 2**30


def read_bandwidth(nbytes: int = GIB, repeats: int = 5) -> float:
  """Bytes per second a jitted reduction reads from memory (the best of `repeats`)."""
  x = jnp.ones(nbytes // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return nbytes / best


def decode_weight_bytes(state, row: np.ndarray, cfg) -> int:
  """Bytes of the weights one decode step reads at budget `row`: every LLM layer, the CA
  modules of the layers that run CA, the final norm and the head (the tied embedding for
  LLaVA-OV 0.5B; one embedding row besides, negligible). `state`: the model's nnx state."""
  from visor_jax.inference.generate import _layer_tables
  nbytes = lambda tree: sum(int(x.nbytes) for x in jax.tree.leaves(tree))  # noqa: E731
  dec = state["decoder"]
  total = nbytes(dec["layers"]) + nbytes(dec["norm"])
  if "cross" in dec:
    active_ca = int(_layer_tables(cfg, row)["is_ca"].sum())
    total += nbytes(dec["cross"]) // len(cfg.visor.ca_layers) * active_ca
  head = state["lm_head"] if "lm_head" in state else state["embed"]
  return total + nbytes(head)


def transformers_ms_per_token(model_cfg, sample, token_ids: Sequence[int], image: np.ndarray,
                              new_tokens: int, repeats: int) -> float:
  """transformers' LLaVA-OV `generate` (KV cache, greedy) on our prompt and crops: the median
  gap between tokens, the fastest of `repeats` runs."""
  import torch
  import transformers

  from visor_jax.benchmarks import transformers_ref

  model, kw, pixels = transformers_ref.model_and_inputs(model_cfg, sample, token_ids, image)
  stamps: list[float] = []

  class Stamp(transformers.LogitsProcessor):
    def __call__(self, input_ids, scores):
      stamps.append(time.perf_counter())
      return scores

  best = np.inf
  for _ in range(repeats):
    stamps.clear()
    with torch.inference_mode():
      model.generate(**kw, pixel_values=pixels, do_sample=False,
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                     pad_token_id=0, logits_processor=transformers.LogitsProcessorList([Stamp()]))
    best = min(best, float(np.median(np.diff(stamps))))
  return best * 1e3
