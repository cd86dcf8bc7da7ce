"""A training curriculum on the pages dataset: phases of pages builds, read one after another.

WHY (docs/pages_dataset.md, "The relation curriculum and the hop loss"): trained on full pages
from the start, a model never leaves chance on the relation families; it learns them when it
first reads single digits (1 x 1 pages), then finds the one coloured digit, then answers
relations on sparse pages with 1, 2, 4, 8 white digits, then on full pages. The reproduction
runs those phases as separate training runs; `data.pages_curriculum` puts them in one run, so
the default command (`configs/universal.py`) trains one model through all of them.

    data.pages_curriculum = "readout:200,fine/1:150,fine:200,all/2@control+interaction:300,all:300"

Each phase is `WHAT:STEPS`. WHAT is `readout` (1 x 1 pages: one coloured digit,
`pages.readout_example`) or a '+'-joined list of families (`all`: every family), optionally
with `/K`: sparse pages keeping K white digits (`pages.sparse_layout`), and `@FAMILIES`: only
those families' questions get sparse pages, the others full ones. A phase's train records
are a pages build of their own with STEPS x global-batch records; the run reads the phases in
order, each build in its own order (every record is an independent draw, so there is nothing to
shuffle), so step s trains on the phase whose steps hold s, on every host and after a resume
(the data iterator's position is checkpointed as before). Validation and test stay the full
pages of `data.pages_*`, whatever the curriculum.
"""
from __future__ import annotations

import bisect
import collections.abc
import dataclasses
from typing import Any, Sequence

from visor_jax.data import pages

ALL = "all"
READOUT = "readout"


@dataclasses.dataclass(frozen=True)
class Phase:
  steps: int
  readout: bool = False
  families: tuple[str, ...] = pages.FAMILIES
  white_digits: int = 0       # > 0: sparse pages (pages.sparse_layout)
  sparse_families: tuple[str, ...] = pages.FAMILIES   # whose pages white_digits thins

  @property
  def label(self) -> str:
    if self.readout:
      return READOUT
    what = ALL if self.families == pages.FAMILIES else "+".join(self.families)
    if self.white_digits:
      what += f"/{self.white_digits}"
      if self.sparse_families != pages.FAMILIES:
        what += "@" + "+".join(self.sparse_families)
    return what


def parse(text: str) -> tuple[Phase, ...]:
  """'readout:200,fine:500,all/4:250' → the phases ('' → none); a clear error otherwise."""
  phases = []
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    what, sep, steps = item.rpartition(":")
    if not sep or not steps.isdigit() or int(steps) <= 0:
      raise ValueError(f"data.pages_curriculum: {item!r} is not WHAT:STEPS with STEPS > 0 "
                       "(e.g. 'readout:200', 'fine:500', 'all/4:250').")
    what, slash, white = what.partition("/")
    white, at, thin = white.partition("@")
    if slash and (not white.isdigit() or int(white) <= 0):
      raise ValueError(f"data.pages_curriculum: {item!r}: the number of white digits after "
                       "'/' must be a positive integer.")
    if what == READOUT:
      if slash:
        raise ValueError(f"data.pages_curriculum: {item!r}: readout pages are 1 x 1, "
                         "they take no '/K'.")
      phases.append(Phase(int(steps), readout=True))
      continue
    if at and not thin:
      raise ValueError(f"data.pages_curriculum: {item!r}: name the families after '@'.")
    families = pages.FAMILIES if what == ALL else pages.check_families(what.split("+"))
    phases.append(Phase(int(steps), families=families, white_digits=int(white or 0),
                        sparse_families=pages.check_families(thin.split("+")) if thin
                        else pages.FAMILIES))
  return tuple(phases)


def total_steps(phases: Sequence[Phase]) -> int:
  return sum(p.steps for p in phases)


def check(config) -> tuple[Phase, ...]:
  """The run's phases; a curriculum must be pages data and span exactly `num_steps` (a
  longer run would start the curriculum over; a shorter one would never reach full pages)."""
  phases = parse(config.data.get("pages_curriculum", ""))
  if not phases:
    return phases
  if config.data.source != "pages":
    raise ValueError(f"data.pages_curriculum is for source='pages', not {config.data.source!r}.")
  if total_steps(phases) != config.num_steps:
    raise ValueError(f"data.pages_curriculum spans {total_steps(phases)} steps but "
                     f"num_steps={config.num_steps}: make them equal.")
  return phases


def phase_params(params: dict, phase: Phase, num_records: int) -> dict:
  """The pages build parameters of one phase: the run's (`sources.pages_params`) with the
  phase's kind of page and `num_records` train records (no validation or test)."""
  return {**params, "sizes": dict(train=num_records, validation=0, test=0),
          "readout": phase.readout, "families": phase.families,
          "white_digits": phase.white_digits, "sparse_families": phase.sparse_families}


class Concatenated(collections.abc.Sequence):
  """Random access to several record sequences one after another (integer indices)."""

  def __init__(self, parts: Sequence[Sequence[Any]]):
    self._parts = list(parts)
    self._starts = [0]
    for p in self._parts:
      self._starts.append(self._starts[-1] + len(p))

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int):  # grain reads records by index
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    part = bisect.bisect_right(self._starts, index) - 1
    return self._parts[part][index - self._starts[part]]
