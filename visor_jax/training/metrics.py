"""Metrics: `clu.metrics` for aggregation; TensorBoard event files (tensorboardX, no
TensorFlow) and a JSONL log in the workdir (local or `gs://`, through `paths`); human progress
lines. Only process 0 writes. A resumed run rewrites neither twice (`Writer`)."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from clu import metrics as clu_metrics

from visor_jax import paths


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
      paths.makedirs(workdir)
      path = paths.join(workdir, "metrics.jsonl")
      tb_dir = paths.join(workdir, "tensorboard")
      attempt = (sum("tfevents" in f for f in paths.listdir(tb_dir)) if paths.isdir(tb_dir)
                 else 0)
      if paths.is_remote(workdir):
        self._jsonl = _RewrittenJsonl(path)
        kept = self._jsonl.drop_rows_after(start_step, redo)
        _register_object_store_events(workdir)
      else:
        kept = _drop_rows_after(path, start_step, redo)
        self._jsonl = open(path, "a")
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
      # Event files are named by the second they open; the attempt number keeps two opened in
      # the same second apart, in order (TensorBoard reads them sorted by name).
      self._tb = SummaryWriter(tb_dir, purge_step=start_step if attempt else None,
                               filename_suffix=f".{attempt:04d}")
      if attempt:
        for row in kept:
          self._add_tb(start_step, {k: v for k, v in row.items() if k != "step"})

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


def _kept_lines(lines, step: int, redo: tuple[str, ...], at_step: list[dict]):
  """metrics.jsonl's lines filtered for a resume at `step`, as (line, changed) pairs: line is
  None for a dropped row (after `step`, cut short, or only `redo` scalars), else the kept line
  (step `step`'s without its `redo` scalars) ending in a newline; `changed`: the file must be
  rewritten for it. Step `step`'s kept rows are appended to `at_step`."""
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
      yield None, True
      continue
    if row["step"] > step:
      yield None, True
      continue
    changed = False
    if row["step"] == step:
      trimmed = {k: v for k, v in row.items() if not k.startswith(redo)} if redo else row
      if trimmed != row:
        changed, line = True, json.dumps(trimmed) + "\n"
      if len(trimmed) == 1:  # nothing but "step" left
        yield None, changed
        continue
      at_step.append(trimmed)
    if not line.endswith("\n"):  # the last line, cut short after its JSON
      changed, line = True, line + "\n"
    yield line, changed


def _drop_rows_after(path: str, step: int, redo: tuple[str, ...]) -> list[dict]:
  """Rewrites a local metrics.jsonl without its rows after `step` and without step `step`'s
  `redo` scalars; returns the rows kept at `step`. Streamed to a temporary file that replaces
  the old one only when something was dropped: a kill mid-way leaves the old file, never half
  of it."""
  if not os.path.exists(path):
    return []
  tmp, at_step, changed = path + ".tmp", [], False
  with open(path) as src, open(tmp, "w") as dst:
    for line, line_changed in _kept_lines(src, step, redo, at_step):
      changed |= line_changed
      if line is not None:
        dst.write(line)
  if changed:
    os.replace(tmp, path)
  else:
    os.remove(tmp)
  return at_step


class _RewrittenJsonl:
  """metrics.jsonl on an object store, which cannot append: every line is kept in memory and
  the object is rewritten whole (one atomic upload) at most every `every_s` seconds and on
  close. A killed run loses at most its last `every_s` seconds of rows."""

  def __init__(self, path: str, every_s: float = 30.0):
    self.path, self.every_s = path, every_s
    self._lines: list[str] = []
    self._last = time.monotonic()
    self._dirty = False

  def drop_rows_after(self, step: int, redo: tuple[str, ...]) -> list[dict]:
    """Reads the object's rows kept at a resume from `step` (see `_drop_rows_after`)."""
    at_step = []
    if paths.exists(self.path):
      text = paths.read_text(self.path)
      for line, changed in _kept_lines(text.splitlines(keepends=True), step, redo, at_step):
        self._dirty |= changed
        if line is not None:
          self._lines.append(line)
    if self._dirty:
      self._upload()
    return at_step

  def write(self, line: str) -> None:
    self._lines.append(line)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty and time.monotonic() - self._last >= self.every_s:
      self._upload()

  def _upload(self) -> None:
    paths.atomic_write(self.path, "".join(self._lines))
    self._last, self._dirty = time.monotonic(), False

  def close(self) -> None:
    if self._dirty:
      self._upload()


class _ObjectEventFile:
  """A TensorBoard event file on an object store, written through `paths` (tensorboardX's
  own gs:// writer talks to google-cloud-storage directly, with its own credentials): the
  events are buffered and the object rewritten whole on each flush (every 120 s, and on
  close: tensorboardX's flush cadence)."""

  def __init__(self, path: str):
    self.path, self._buffer, self._flushed = path, bytearray(), -1

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self) -> None:
    if len(self._buffer) != self._flushed:
      paths.atomic_write(self.path, bytes(self._buffer))
      self._flushed = len(self._buffer)

  def close(self) -> None:
    self.flush()


class _ObjectEventFiles:
  """tensorboardX's writer factory interface (`open`, `directory_check`)."""

  def open(self, path: str) -> _ObjectEventFile:
    return _ObjectEventFile(path)

  def directory_check(self, path: str) -> None:
    paths.makedirs(path)


def _register_object_store_events(workdir: str) -> None:
  """Routes tensorboardX's event files for `workdir`'s scheme (e.g. 'gs') through `paths`."""
  from tensorboardX import record_writer
  record_writer.register_writer_factory(workdir.split("://", 1)[0], _ObjectEventFiles())


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
