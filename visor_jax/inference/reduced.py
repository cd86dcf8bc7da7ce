"""Greedy generation under a token reduction (models/token_reduction.py), without a KV cache.

Each step re-runs the reduced forward on the whole growing sequence and takes the argmax at
every sample's last token: what `tests/test_generate.py::_uncached_greedy` does for the plain
model. It is quadratic in the answer length, which the tiny and small models afford; it keeps
the peers in one piece of code (no reduced KV cache to get right) for evaluation only.

The ranking token is pinned to the last *prompt* token (`rank_index`), so the kept set is the
one a cached implementation would fix at prefill, and generated tokens see only kept visual
tokens from the drop layer on, as they would in the pruned cache.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visor_jax.models import token_reduction as tr


@dataclasses.dataclass
class ReducedGeneration:
  tokens: np.ndarray      # int32[B, max_new_tokens], -1 after a sample stopped
  num_tokens: np.ndarray  # int32[B] generated tokens (including the stop token)
  kept: np.ndarray        # int32[B, L] visual tokens each layer attended over (the prompt's)


class ReducedGenerator:
  """Jitted reduced forwards for one model, one compiled program per (shapes, reduction,
  capacity); weights are an argument."""

  def __init__(self, model):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    self._steps = {}

  def _step(self, reduction: tr.Reduction, capacity: int | None):
    key = (reduction, capacity)
    if key not in self._steps:
      g = self.graphdef

      def step(state, x, budget, rank_index, last):
        out = tr.reduced_forward(nnx.merge(g, state), x, reduction, budget,
                                 rank_index=rank_index, capacity=capacity)
        logits = jnp.take_along_axis(out.logits, last[:, None, None], axis=1)[:, 0]
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), out.kept
      self._steps[key] = jax.jit(step)
    return self._steps[key]

  def generate(self, inputs: Mapping[str, np.ndarray], reduction: tr.Reduction,
               budget: np.ndarray | None, *, max_new_tokens: int,
               stop_ids: Sequence[int] = (), capacity_multiple: int = 16) -> ReducedGeneration:
    """Greedy answers for a collated batch whose text length leaves room for
    `max_new_tokens` after every prompt. `budget`: None (all-SA) for the peers, bool[B, L]
    for VISOR-TR."""
    x = {k: np.array(v) for k, v in inputs.items()}
    b, t = x["tokens"].shape
    prompt = x["text_valid"].sum(axis=1).astype(np.int32)
    if int(prompt.max()) + max_new_tokens > t:
      raise ValueError(f"text length {t} leaves no room for {max_new_tokens} new tokens after a "
                       f"{int(prompt.max())}-token prompt.")
    capacity = (tr.visor_tr_capacity(self.cfg, x, reduction, capacity_multiple)
                if reduction.method == "visor_tr" else None)
    step = self._step(reduction, capacity)
    out = ReducedGeneration(np.full((b, max_new_tokens), -1, np.int32), np.zeros(b, np.int32),
                            np.zeros((b, self.cfg.num_layers), np.int32))
    rank_index = jnp.asarray(prompt - 1)
    length, done = prompt.copy(), np.zeros(b, bool)
    stop = np.asarray(list(stop_ids), np.int32)
    for i in range(max_new_tokens):
      token, kept = step(self.state, x, budget, rank_index, jnp.asarray(length - 1))
      token = np.asarray(token)
      if i == 0:
        out.kept[:] = np.asarray(kept)
      live = ~done
      out.tokens[live, i] = token[live]
      out.num_tokens[live] += 1
      done |= np.isin(token, stop)
      if done.all():
        break
      rows = np.flatnonzero(live)   # text_pos of the next slot is already last + 1 (collate)
      x["tokens"][rows, length[rows]] = token[rows]
      x["text_valid"][rows, length[rows]] = True
      length[rows] += 1
    return out
