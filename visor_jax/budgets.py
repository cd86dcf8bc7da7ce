"""The budget vocabulary: what a budget is, how it is written, read, checked and sampled.

A budget is the set of LLM layers that run full self-attention (SA) over [vision; text]; every
other layer sees text only (plus cross-attention on the CA layers). Two spellings, one meaning:

  sa_layers   list[int], sorted          [1, 4]; [] is CA-only     (configs, CLIs, files, logs)
  mask        bool[B, L], one row each   the compiled step's / forward's argument

and a list of budgets (`layer_sets`, cheapest first when it is a feasible set) is
list[list[int]]. The training path is config → `resolve` (validated before anything compiles)
→ `sample` (host, pure in seed and step) → `mask` → the compiled step → `models/visor.py`,
where a layer whose bit is off does no visual work. Changing a budget never recompiles.

Names on the command line and in configs (`parse`, `resolve`):
  '1,4' or '[1,4]'   those layers        '[]', 'none', 'ca-only'   CA-only
  'maximal'          every SA candidate  'all'   every layer (the original LLaVA-OV;
                                                  serving and evaluation only)
Lists: '[];[4];[1,4]', a feasible.json path, 'default' (`default_feasible`), 'maximal', or a
Python list of layer lists. Every budget that reaches a model is checked by `validate`:
layers must be SA candidates (or the whole model, for 'all').
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from visor_jax import paths
from visor_jax.config_lib import ModelConfig

LayerSets = list[list[int]]
FEASIBLE_KEY = "feasible_budgets"   # the list inside a feasible.json file


# ---------------------------------------------------------------------------------------------
# Spellings.

def mask(cfg: ModelConfig, sa_layers: Sequence[int], batch: int = 1) -> np.ndarray:
  """bool[batch, L] with `sa_layers` on (indices range-checked; see `validate` for meaning)."""
  out = np.zeros((batch, cfg.num_layers), bool)
  for i in sa_layers:
    if not 0 <= int(i) < cfg.num_layers:
      raise ValueError(f"budget: SA layer {i} is out of range [0, {cfg.num_layers}).")
    out[:, int(i)] = True
  return out


def layers_of(mask_row: Any) -> list[int]:
  """One mask row → sorted SA layers."""
  return [int(i) for i in np.flatnonzero(np.asarray(mask_row))]


def label(sa_layers: Sequence[int]) -> str:
  """'SA{1,4}' / 'CA-only': how logs, tables and result files name a budget."""
  layers = sorted(int(i) for i in sa_layers)
  return "SA{" + ",".join(map(str, layers)) + "}" if layers else "CA-only"


def file_label(sa_layers_or_label: Sequence[int] | str) -> str:
  """A label safe in file names and TensorBoard tags: 'SA{1,4}' → 'SA_1_4'."""
  text = (sa_layers_or_label if isinstance(sa_layers_or_label, str)
          else label(sa_layers_or_label))
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_") or "run"


def all_sa(cfg: ModelConfig, batch: int = 1) -> np.ndarray:
  """Every layer self-attends over [vision; text]: the original LLaVA-OV."""
  return mask(cfg, range(cfg.num_layers), batch)


def ca_only(cfg: ModelConfig, batch: int = 1) -> np.ndarray:
  """No SA layer: text reads vision only through the cross-attention layers."""
  return mask(cfg, [], batch)


def maximal(cfg: ModelConfig) -> list[int]:
  """Every SA candidate: VISOR's most expensive budget."""
  return list(cfg.visor.sa_candidates)


# ---------------------------------------------------------------------------------------------
# Checking.

def validate(cfg: ModelConfig, sa_layers: Sequence[Any], field: str = "budget", *,
             allow_all: bool = False) -> list[int]:
  """Sorted SA layers, checked against the model: each an SA candidate, no duplicates.
  `allow_all` also accepts every layer at once (LLaVA-OV, for serving and evaluation).
  Errors name `field` (the config key or flag the budget came from)."""
  try:
    layers = sorted(int(i) for i in sa_layers)
  except (TypeError, ValueError):
    raise ValueError(f"{field}: {sa_layers!r} is not a list of layer indices.") from None
  if len(set(layers)) != len(layers):
    raise ValueError(f"{field}: duplicate layers in {layers}.")
  if allow_all and layers == list(range(cfg.num_layers)):
    return layers
  cands = set(cfg.visor.sa_candidates)
  bad = [i for i in layers if i not in cands]
  if bad:
    ca = [i for i in bad if i in cfg.visor.ca_layers]
    raise ValueError(f"{field}: layer(s) {bad} of {layers} are not SA candidates "
                     f"{list(cfg.visor.sa_candidates)}" + (f" ({ca} are CA layers)" if ca else "")
                     + ".")
  return layers


def validate_sets(cfg: ModelConfig, layer_sets: Sequence[Sequence[Any]], field: str = "budgets",
                  *, allow_all: bool = False) -> LayerSets:
  """Each budget of a list `validate`d; no duplicates; not empty."""
  if isinstance(layer_sets, (str, bytes)) or not isinstance(layer_sets, Sequence) and not \
      hasattr(layer_sets, "__iter__"):
    raise ValueError(f"{field}: {layer_sets!r} is not a list of layer lists.")
  sets = [validate(cfg, s, f"{field}[{i}]", allow_all=allow_all)
          for i, s in enumerate(layer_sets)]
  if not sets:
    raise ValueError(f"{field}: the list of budgets is empty.")
  if len({tuple(s) for s in sets}) != len(sets):
    raise ValueError(f"{field}: duplicate budgets in {sets}.")
  return sets


def check_mask(cfg: ModelConfig, budget: Any, batch: int) -> None:
  """A mask's shape and dtype, before it reaches a compiled function (its values are data)."""
  shape, dtype = tuple(np.shape(budget)), getattr(budget, "dtype", None)
  if shape != (batch, cfg.num_layers):
    raise ValueError(f"budget: expected bool[batch={batch}, layers={cfg.num_layers}] (one bit "
                     f"per LLM layer), got shape {shape}.")
  if dtype != bool:
    raise ValueError(f"budget: expected dtype bool, got {dtype}.")


# ---------------------------------------------------------------------------------------------
# Reading: command lines, configs, feasible files.

def parse(text: str | None) -> list[int] | str | None:
  """One budget as typed: None/'' → None (the router decides, or maximal without one);
  '[]'/'none'/'ca-only' → []; 'all'/'maximal' kept as names; '1,4'/'[1,4]' → [1, 4]."""
  if text is None or not str(text).strip():
    return None
  t = str(text).strip().lower()
  if t in ("all", "maximal"):
    return t
  if t in ("[]", "none", "ca-only", "ca_only"):
    return []
  try:
    return sorted(int(x) for x in t.strip("[]").split(",") if x.strip())
  except ValueError:
    raise ValueError(f"budget {text!r}: expected '1,4', '[]', 'all' or 'maximal'.") from None


def resolve_one(cfg: ModelConfig, budget: Sequence[int] | str | None, field: str = "sa_layers"
                ) -> list[int] | None:
  """A budget given by name or layers → validated SA layers ('all' allowed); None stays None."""
  if isinstance(budget, str):
    budget = parse(budget)
  if budget is None:
    return None
  if budget == "maximal":
    return maximal(cfg)
  if budget == "all":
    return list(range(cfg.num_layers))
  return validate(cfg, budget, field, allow_all=True)


def resolve(spec: Any, cfg: ModelConfig, field: str = "budgets", *, allow_all: bool = False
            ) -> LayerSets:
  """A list of budgets from a config or flag (see the module doc) → validated `LayerSets`.
  None or 'default' → `default_feasible`; `allow_all` admits 'all' (every layer)."""
  if spec is None or (isinstance(spec, str) and spec.strip() == "default"):
    return default_feasible(cfg)
  if isinstance(spec, str):
    s = spec.strip()
    if s == "maximal":
      return [maximal(cfg)]
    if paths.isfile(s):
      return validate_sets(cfg, read_feasible(s), f"{field} ({s})", allow_all=allow_all)
    if s.endswith(".json"):
      raise ValueError(f"{field}: no file {s!r}.")
    parsed = []
    for part in s.split(";"):
      one = parse(part if part.strip() else "[]")
      if one == "maximal" or (one == "all" and allow_all):
        one = maximal(cfg) if one == "maximal" else list(range(cfg.num_layers))
      elif isinstance(one, str):
        raise ValueError(f"{field}: {part!r} in {spec!r} is not a list of layers.")
      parsed.append(one)
    return validate_sets(cfg, parsed, field, allow_all=allow_all)
  return validate_sets(cfg, list(spec), field, allow_all=allow_all)


def write_feasible(path: str | os.PathLike, layer_sets: Sequence[Sequence[int]],
                   **extra: Any) -> dict:
  """feasible.json: {"feasible_budgets": [[...], ...] (cheapest first), **extra} (e.g. the
  search's table). Read back by `read_feasible`, `resolve`, configs' `budgets` and
  `model.router.feasible`."""
  data = {FEASIBLE_KEY: [sorted(int(i) for i in s) for s in layer_sets], **extra}
  path = os.fspath(path)
  paths.makedirs(paths.dirname(paths.normalize(path)))
  with paths.open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)
  return data


def read_feasible(path: str | os.PathLike) -> LayerSets:
  """The budgets of a feasible.json (unvalidated: `resolve` checks them against a model)."""
  path = os.fspath(path)
  with paths.open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e}).") from None
  sets = data.get(FEASIBLE_KEY) if isinstance(data, dict) else None
  if not isinstance(sets, list) or not sets:
    raise ValueError(f"{path}: no non-empty {FEASIBLE_KEY!r} list.")
  try:
    return [sorted(int(i) for i in s) for s in sets]
  except (TypeError, ValueError):
    raise ValueError(f"{path}: {FEASIBLE_KEY!r} is not a list of layer lists.") from None


# ---------------------------------------------------------------------------------------------
# Choosing: the default feasible set and the per-step sample.

def spread_layers(candidates: Sequence[int], k: int) -> list[int]:
  """k of the candidate layers spread evenly over the list, always including the last."""
  if not 0 <= k <= len(candidates):
    raise ValueError(f"budget: {k} SA layers requested, there are {len(candidates)} candidates.")
  if k == 0:
    return []
  n = len(candidates)
  picks = np.round(np.linspace(n - 1, 0, k)[::-1]).astype(int) if k > 1 else [n - 1]
  return sorted(int(candidates[i]) for i in picks)


def default_feasible(cfg: ModelConfig) -> LayerSets:
  """0, 1, 2, 4, 8, ... SA layers spread over the candidates, and all of them."""
  n = len(cfg.visor.sa_candidates)
  sizes = sorted({0, n} | {k for k in (1, 2, 4, 8, 16) if k < n})
  return [spread_layers(cfg.visor.sa_candidates, k) for k in sizes]


def sample(layer_sets: Sequence[Sequence[int]], weights: Sequence[float] | None, seed: int,
           step: int) -> int:
  """Index of the budget used at `step`: a pure function of (seed, step), so a resumed run
  samples exactly what an uninterrupted one would, with no sampler state to checkpoint."""
  p = np.ones(len(layer_sets)) if weights is None else np.asarray(weights, np.float64)
  if len(p) != len(layer_sets) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"budget_weights: {list(p)} do not fit {len(layer_sets)} budgets.")
  return int(np.random.default_rng([seed, step]).choice(len(layer_sets), p=p / p.sum()))
