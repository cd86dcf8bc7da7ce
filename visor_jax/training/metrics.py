"""Metrics: `clu.metrics` for aggregation; TensorBoard event files (tensorboardX, no
TensorFlow) and a JSONL log in the workdir; human progress lines. Only process 0 writes.
A resumed run rewrites neither twice (`Writer`)."""
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
  """Scalars to TensorBoard and `metrics.jsonl`; a no-op on processes other than 0.

  A run reopened at `start_step` (the step its checkpoint holds; 0 for a fresh start) redoes
  every later step, so a previous attempt's rows after it are dropped from metrics.jsonl
  (rewritten atomically) before anything is appended, as are step `start_step`'s scalars
  whose names start with one of `redo` (a finished run's rerun repeats its evaluation).
  Each (step, name) is then written once.

  TensorBoard: every attempt writes a new event file (tensorboardX cannot append to one). It
  opens with a purge at `start_step` (TensorBoard's legacy loader then ignores the older files'
  events from that step on; the default loader, RustBoard, lets a later point of a scalar
  replace every earlier one at or after its step) and repeats the kept step-`start_step` rows,
  so each scalar shows once per step under either loader.
  """

  def __init__(self, workdir: str, start_step: int = 0, redo: tuple[str, ...] = ()):
    self.enabled = jax.process_index() == 0
    self._tb = self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      kept = _drop_rows_after(path, start_step, redo)
      tb_dir = os.path.join(workdir, "tensorboard")
      attempt = sum("tfevents" in f for f in os.listdir(tb_dir)) if os.path.isdir(tb_dir) else 0
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
      # Event files are named by the second they open; the attempt number keeps two opened in
      # the same second apart, in order (TensorBoard reads them sorted by name).
      self._tb = SummaryWriter(tb_dir, purge_step=start_step if attempt else None,
                               filename_suffix=f".{attempt:04d}")
      if attempt:
        for row in kept:
          self._add_tb(start_step, {k: v for k, v in row.items() if k != "step"})
      self._jsonl = open(path, "a")

  def _add_tb(self, step: int, scalars: dict) -> None:
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._add_tb(step, scalars)
    self._jsonl.write(json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in
                                                          scalars.items()}}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _drop_rows_after(path: str, step: int, redo: tuple[str, ...]) -> list[dict]:
  """Rewrites metrics.jsonl without its rows after `step` and without step `step`'s `redo`
  scalars; returns the rows kept at `step`. Streamed to a temporary file that replaces the old
  one only when something was dropped: a kill mid-way leaves the old file, never half of it."""
  if not os.path.exists(path):
    return []
  tmp, at_step, changed = path + ".tmp", [], False
  with open(path) as src, open(tmp, "w") as dst:
    for line in src:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a kill
        changed = True
        continue
      if row["step"] > step:
        changed = True
        continue
      if row["step"] == step:
        trimmed = {k: v for k, v in row.items() if not k.startswith(redo)} if redo else row
        if trimmed != row:
          changed, line = True, json.dumps(trimmed) + "\n"
        if len(trimmed) == 1:  # nothing but "step" left
          continue
        at_step.append(trimmed)
      if not line.endswith("\n"):  # the last line, cut short after its JSON
        changed, line = True, line + "\n"
      dst.write(line)
  if changed:
    os.replace(tmp, path)
  else:
    os.remove(tmp)
  return at_step


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
