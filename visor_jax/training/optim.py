"""Optimizer from the config: parameter groups by regex, freezing, AdamW, warm-up + cosine.

`config.optim.param_groups` is an ordered list of (regex, group) pairs matched (fullmatch)
against dotted parameter paths such as 'decoder.cross.attn.q_proj.kernel'; the first match
wins. The group 'frozen' is not trained at all (not even differentiated); every other group
gets AdamW with the base learning rate times `config.optim.lr_mult[group]` (default 1).
Stage 1 / stage 2 / universal differ only in these rules, never in code.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import optax
from flax import traverse_util

FROZEN = "frozen"


def param_labels(params: dict, groups: Sequence[Sequence[str]]) -> dict[str, str]:
  """{dotted path: group} for every parameter; a path no rule matches is an error."""
  compiled = [(re.compile(rx), g) for rx, g in groups]
  labels = {}
  for path in traverse_util.flatten_dict(params, sep="."):
    for rx, group in compiled:
      if rx.fullmatch(path):
        labels[path] = group
        break
    else:
      raise ValueError(f"optim.param_groups: no rule matches parameter {path!r} "
                       "(end the list with ('.*', <group>)).")
  return labels


def split(params: dict, labels: dict[str, str]) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts."""
  flat = traverse_util.flatten_dict(params, sep=".")
  trainable = {k: v for k, v in flat.items() if labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
  return (traverse_util.unflatten_dict(trainable, sep="."),
          traverse_util.unflatten_dict(frozen, sep="."))


def merge(trainable: dict, frozen: dict) -> dict:
  flat = traverse_util.flatten_dict(trainable, sep=".")
  flat.update(traverse_util.flatten_dict(frozen, sep="."))
  return traverse_util.unflatten_dict(flat, sep=".")


def schedule(o: Any, total_steps: int, mult: float = 1.0) -> optax.Schedule:
  """Linear warm-up from 0, cosine decay to `end_lr_frac` of the peak at `total_steps`."""
  peak = o.lr * mult
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=o.warmup_steps,
      decay_steps=max(total_steps, o.warmup_steps + 1), end_value=peak * o.end_lr_frac)


def make_optimizer(o: Any, labels: dict[str, str], total_steps: int
                   ) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW per group (on the trainable tree only)."""
  groups = sorted({g for g in labels.values() if g != FROZEN})
  if not groups:
    raise ValueError("optim.param_groups: every parameter is frozen; nothing to train.")
  lr_mult = dict(o.get("lr_mult", {}) or {})
  unknown = set(lr_mult) - set(groups) - {FROZEN}
  if unknown:
    raise ValueError(f"optim.lr_mult names unknown group(s) {sorted(unknown)}; "
                     f"groups are {groups}.")
  trainable_labels = traverse_util.unflatten_dict(
      {k: g for k, g in labels.items() if g != FROZEN}, sep=".")
  per_group = {
      g: optax.adamw(schedule(o, total_steps, lr_mult.get(g, 1.0)), b1=o.b1, b2=o.b2,
                     eps=o.eps, weight_decay=o.weight_decay)
      for g in groups}
  return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.multi_transform(per_group, trainable_labels))
