"""Resuming a run's data position with a different number of processes.

Each process checkpoints its own iterator state (grain: `process_<i>-of-<n>.json` in the
checkpoint's `data` item). A run resumed with as many processes restores those files as they
are. With another count, the files do not fit: host i of n read every n-th record of the
shuffled, repeated stream (`pipeline.make_dataset`: `ds[i::n]`), so its position k ("next
sharded index") stands for global record k * n + i. This module turns the saved positions into
the new hosts' positions:

  g = the first global record that some old host had not yet put into a batch
      (its next index, or a record still waiting in a bucket buffer)
  new host j of m starts at its first sharded index whose global record is ≥ g:
      ceil((g - j) / m)

When every old host stood at the same step of the same batch size (one text bucket, no bad
records: the usual case) this is exact: the resumed run reads the very batches the old one
would have. Otherwise records a faster host had already read past g are read again; how many
is logged. Counts of bad records (a host-local statistic) go to the new process 0.

Only the in-process pipeline's state (`data.num_workers=0`) is remapped: grain's worker
states cannot be resumed with another worker count either. Resuming with another process
count and workers raises an error saying so.
"""
from __future__ import annotations

import json
import logging
import re

log = logging.getLogger(__name__)
_NAME = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def saved_states(checkpoints_dir, step: int) -> dict[int, dict]:
  """{process index: state} of a checkpoint's `data` item (`checkpoints_dir`: local or gs://;
  {} when it has none); raises if it holds files of several process counts."""
  from etils import epath
  data_dir = epath.Path(checkpoints_dir) / str(step) / "data"
  states, counts = {}, set()
  if not data_dir.exists():  # a checkpoint saved without its data position
    return states
  for f in epath.Path(data_dir).iterdir():
    m = _NAME.search(f.name)
    if m:
      states[int(m.group(1))] = json.loads(f.read_text())
      counts.add(int(m.group(2)))
  if len(counts) != 1 or sorted(states) != list(range(next(iter(counts)))):
    raise ValueError(f"{data_dir}: expected process_<i>-of-<n>.json for i < n, found "
                     f"{sorted(states)} of counts {sorted(counts)}.")
  return states


def _bucket_state(state: dict) -> dict:
  """The bucket batcher's state inside the guard's (see `pipeline._GuardIterator`)."""
  inner = state["parent"]
  if "next_index" not in inner.get("parent", {}):
    raise ValueError("this checkpoint's data state comes from grain worker processes "
                     "(data.num_workers > 0); it can only be resumed with the same number of "
                     "processes and workers. Resume with the process count that wrote it, or "
                     "start the data afresh.")
  return inner


def remap(states: dict[int, dict], index: int, count: int) -> dict:
  """Process `index` of `count`'s iterator state, from the states `saved_states` read (written
  by another number of processes); see the module docstring."""
  old = len(states)
  firsts, nexts = [], {}
  for i, state in states.items():
    b = _bucket_state(state)
    nexts[i] = int(b["parent"]["next_index"])
    waiting = [key for buf in b["buffers"] for key in buf]
    firsts.append(min([nexts[i]] + waiting) * old + i)
  g = min(firsts)
  # Old host i had read its records j < nexts[i], global j * old + i; those ≥ g come again.
  reread = sum(max(0, k + (i - g) // old) for i, k in nexts.items())
  if index == 0 and reread:
    log.warning("resuming %d process(es)' data with %d: hosts stood at different records; "
                "%d record(s) that faster hosts had read past the slowest one's position are read "
                "again", old, count,
                reread)
  template = _bucket_state(states[0])
  zeros = [0] * len(template["bad"])
  totals = lambda key: [sum(int(_bucket_state(s)[key][r]) for s in states.values())
                        for r in range(len(template[key]))]
  bucket = {"parent": {"next_index": max(0, -(-(g - index) // count))},
            "buffers": [[] for _ in template["buffers"]],
            "pending": totals("pending") if index == 0 else zeros,
            "bad": totals("bad") if index == 0 else zeros,
            "seen": sum(int(_bucket_state(s)["seen"]) for s in states.values())
            if index == 0 else 0}
  return {"parent": bucket, "bad": list(bucket["bad"]), "seen": bucket["seen"]}
