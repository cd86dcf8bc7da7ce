"""The router: picks each sample's budget from the feasible set, mid-prefill.

An MLP (RMSNorm → Linear → GELU → Linear) reads the hidden state of the last prompt token as
it enters the first SA-candidate layer and scores the K feasible budgets (cheapest first). It is
trained on pseudo-labels "the cheapest budget that reaches 99% of the full budget's score", so
P(label <= k) estimates "budget k suffices". The cost knob `threshold` picks the cheapest k with
P(label <= k) >= threshold: a higher threshold buys accuracy with FLOPs, monotonically, with no
retraining (and no recompilation: it is an argument).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visor_jax.config_lib import ModelConfig
from visor_jax.models.nn import Dense, RMSNorm

Array = jax.Array


class Router(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    d, r = cfg.text.hidden_size, cfg.router
    kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype, bias=True)
    self.norm = RMSNorm(d, cfg.text.rms_norm_eps, param_dtype=param_dtype)
    self.fc1 = Dense(d, r.hidden, ("embed", "router_hidden"), **kw)
    self.fc2 = Dense(r.hidden, len(r.feasible), ("router_hidden", None), **kw)
    # The feasible budgets as static Python data (not state): bool[K][L], cheapest first.
    self.feasible = tuple(tuple(i in layers for i in range(cfg.num_layers))
                          for layers in r.feasible)

  @property
  def table(self) -> np.ndarray:
    return np.asarray(self.feasible, bool)

  def __call__(self, h: Array) -> Array:
    """h: float[B, D] → logits float32[B, K] (computed in float32)."""
    x = self.norm(h.astype(jnp.float32))
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def choose(logits: Array, threshold: Array | float) -> Array:
  """int32[B]: the cheapest k with P(label <= k) >= threshold (k = K-1 if none reaches it)."""
  cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
  reached = cdf >= jnp.asarray(threshold, jnp.float32)[..., None] - 1e-6
  return jnp.argmax(reached, axis=-1).astype(jnp.int32)  # first True; cdf[-1] = 1 always


def last_prompt_index(text_valid: Array) -> Array:
  """int32[B]: index of the last valid text token (the routing token)."""
  t = text_valid.shape[1]
  return (t - 1 - jnp.argmax(text_valid[:, ::-1], axis=1)).astype(jnp.int32)
