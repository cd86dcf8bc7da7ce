"""Metrics: `clu.metrics` for aggregation; TensorBoard event files (tensorboardX, no
TensorFlow) and a JSONL log in the workdir; human progress lines. Only process 0 writes."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from clu import metrics as clu_metrics


class Averages:
  """Named running means over a logging interval, merged with `clu.metrics.Average`."""

  def __init__(self):
    self._m: dict[str, clu_metrics.Average] = {}

  def add(self, **values) -> None:
    for k, v in values.items():
      new = clu_metrics.Average.from_model_output(np.asarray(v, np.float32))
      self._m[k] = self._m[k].merge(new) if k in self._m else new

  def compute_and_reset(self) -> dict[str, float]:
    out = {k: float(m.compute()) for k, m in self._m.items()}
    self._m = {}
    return out


class Writer:
  """Scalars to TensorBoard and `metrics.jsonl`; a no-op on processes other than 0."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in
                                                          scalars.items()}}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _jsonable(v):
  return v if isinstance(v, (str, int)) else float(v)


class Progress:
  """steps/s, tokens/s and ETA over the last logging interval."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self._t, self._step, self._tokens = time.perf_counter(), first_step, 0

  def update(self, step: int, tokens: int) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    steps = step - self._step
    self._tokens += tokens
    out = {"steps_per_s": steps / dt, "tokens_per_s": self._tokens / dt}
    out["eta_s"] = (self.total - step) / out["steps_per_s"] if steps else float("nan")
    self._t, self._step, self._tokens = now, step, 0
    return out


def format_progress(step: int, total: int, m: dict[str, float]) -> str:
  eta = m.get("eta_s", float("nan"))
  eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if np.isfinite(eta) else "?"
  return (f"step {step}/{total}  loss {m.get('loss', float('nan')):.4f}  "
          f"{m.get('steps_per_s', 0):.2f} steps/s  {m.get('tokens_per_s', 0):.0f} tok/s  "
          f"ETA {eta_s}")


def log(msg: str, *args) -> None:
  """Progress for humans, from process 0 only."""
  if jax.process_index() == 0:
    logging.getLogger("visor_jax").info(msg, *args)
