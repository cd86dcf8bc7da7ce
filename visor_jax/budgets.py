"""What a budget is: a boolean per LLM layer saying "this layer runs full self-attention".

A budget is plain data, bool[B, L] (one row per sample). It flows config → here → the compiled
step's arguments → `models/visor.py`, where each layer reads its bit and skips its visual work
when off. Changing it never recompiles.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from visor_jax.config_lib import ModelConfig


def from_layers(cfg: ModelConfig, sa_layers: Sequence[int], batch: int = 1) -> np.ndarray:
  """bool[batch, L] with the given layers on; indices are validated."""
  out = np.zeros((batch, cfg.num_layers), bool)
  for i in sa_layers:
    if not 0 <= int(i) < cfg.num_layers:
      raise ValueError(f"budget: SA layer {i} is out of range [0, {cfg.num_layers}).")
    out[:, int(i)] = True
  return out


def all_sa(cfg: ModelConfig, batch: int = 1) -> np.ndarray:
  """Every layer self-attends over [vision; text]: the original LLaVA-OV."""
  return from_layers(cfg, range(cfg.num_layers), batch)


def ca_only(cfg: ModelConfig, batch: int = 1) -> np.ndarray:
  """No SA layer: text reads vision only through the cross-attention layers."""
  return from_layers(cfg, [], batch)


def first_candidates(cfg: ModelConfig, k: int, batch: int = 1) -> np.ndarray:
  """The first k SA candidates on (k > #candidates is an error)."""
  cands = cfg.visor.sa_candidates
  if not 0 <= k <= len(cands):
    raise ValueError(f"budget: {k} SA layers requested, model has {len(cands)} candidates.")
  return from_layers(cfg, cands[:k], batch)


def spread_layers(candidates: Sequence[int], k: int) -> list[int]:
  """k of the candidate layers spread evenly over the list, always including the last."""
  if not 0 <= k <= len(candidates):
    raise ValueError(f"budget: {k} SA layers requested, there are {len(candidates)} candidates.")
  if k == 0:
    return []
  n = len(candidates)
  picks = np.round(np.linspace(n - 1, 0, k)[::-1]).astype(int) if k > 1 else [n - 1]
  return sorted(int(candidates[i]) for i in picks)


def spread_candidates(cfg: ModelConfig, k: int, batch: int = 1) -> np.ndarray:
  """bool[batch, L]: k SA candidates spread evenly (`spread_layers`)."""
  return from_layers(cfg, spread_layers(cfg.visor.sa_candidates, k), batch)


def default_feasible(cfg: ModelConfig) -> list[list[int]]:
  """0, 1, 2, 4, 8, ... SA layers spread over the candidates, and all of them."""
  n = len(cfg.visor.sa_candidates)
  sizes = sorted({0, n} | {k for k in (1, 2, 4, 8, 16) if k < n})
  return [spread_layers(cfg.visor.sa_candidates, k) for k in sizes]


def resolve_sets(spec, cfg: ModelConfig) -> list[list[int]]:
  """A config's budget list: None → `default_feasible`; 'maximal' → all SA candidates;
  otherwise a list of SA layer lists, validated."""
  if spec is None:
    return default_feasible(cfg)
  if spec == "maximal":
    return [list(cfg.visor.sa_candidates)]
  if isinstance(spec, str):
    raise ValueError(f"budgets: {spec!r} is not None, 'maximal' or a list of layer lists.")
  sets = [sorted(int(i) for i in layers) for layers in spec]
  for layers in sets:
    from_layers(cfg, layers)
  if not sets:
    raise ValueError("budgets: the list of feasible budgets is empty.")
  return sets


def sample(layer_sets: Sequence[Sequence[int]], weights: Sequence[float] | None, seed: int,
           step: int) -> int:
  """Index of the budget used at `step`: a pure function of (seed, step), so a resumed run
  samples exactly what an uninterrupted one would, with no sampler state to checkpoint."""
  p = np.ones(len(layer_sets)) if weights is None else np.asarray(weights, np.float64)
  if len(p) != len(layer_sets) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"budget_weights: {list(p)} do not fit {len(layer_sets)} budgets.")
  return int(np.random.default_rng([seed, step]).choice(len(layer_sets), p=p / p.sum()))


def check(cfg: ModelConfig, budget, batch: int) -> np.ndarray:
  """Validates a budget's shape and dtype before it reaches a compiled function."""
  b = np.asarray(budget)
  if b.dtype != bool:
    raise ValueError(f"budget: expected a bool array, got dtype {b.dtype}.")
  if b.ndim == 1:
    b = np.broadcast_to(b, (batch, b.shape[0]))
  if b.shape != (batch, cfg.num_layers):
    raise ValueError(f"budget: expected bool[{batch}, {cfg.num_layers}] (one bit per LLM "
                     f"layer), got shape {np.shape(budget)}.")
  return b


def describe(budget_row: np.ndarray) -> str:
  """'SA{1,4}' style label for logs."""
  layers = np.flatnonzero(budget_row)
  return "SA{" + ",".join(map(str, layers)) + "}" if len(layers) else "CA-only"
