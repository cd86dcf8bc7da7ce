"""The pages dataset on disk: its tfds builder (array_record, no TensorFlow), `build` /
`records`, and a command that builds it and prints a few examples:

    python -m visor_jax.data.pages_build --data_dir /tmp/pages --train 8000 --validation 800 --test 1600

What a page and its questions are: `pages.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import tensorflow_datasets as tfds

from visor_jax.data import pages, synthetic
from visor_jax.data.synthetic import SPLITS, Records

# With `build` and `records`, the embedded-dataset interface `sources.EMBEDDED` reads.
corpus = pages.corpus


@dataclasses.dataclass(eq=False)
class PagesConfig(tfds.core.BuilderConfig):
  """Generation parameters; the config name encodes them, so builds never collide."""
  seed: int = 0
  sizes: tuple = ()  # ((split, n), ...)
  grid: int = 8
  permute_rows: bool = False
  read_turn: bool = False
  turns: int = 1
  readout: bool = False
  families: tuple = pages.FAMILIES
  white_digits: int = 0  # > 0: sparse curriculum pages (pages.sparse_layout)
  sparse_families: tuple = pages.FAMILIES  # the families whose pages white_digits thins


def make_config(seed=0, sizes=None, grid=8, permute_rows=False, read_turn=False,
                turns=1, readout=False, families=pages.FAMILIES,
                white_digits=0, sparse_families=pages.FAMILIES) -> PagesConfig:
  sizes = {**pages.DEFAULT_SIZES, **(sizes or {})}
  if set(sizes) != set(SPLITS) or min(sizes.values()) < 0:
    raise ValueError(f"sizes must give counts >= 0 for splits {SPLITS}, got {sizes}")
  pages.check_grid(int(grid))
  name = f"seed{seed}-" + "-".join(f"{s}{sizes[s]}" for s in SPLITS)
  if readout:  # 1 x 1 pages whatever the grid: one name for every grid
    name += "-readout"
  else:
    name += (f"-grid{grid}" + ("-permuted" if permute_rows else "")
             + ("-read" if read_turn else "") + (f"-turns{turns}" if turns > 1 else "")
             + (f"-white{white_digits}" if white_digits else ""))
    if white_digits and (permute_rows or white_digits < 0):
      raise ValueError(f"white_digits={white_digits}: expected >= 0, never with permute_rows")
    families = pages.check_families(families)
    sparse_families = pages.check_families(sparse_families)
    if white_digits and sparse_families != pages.FAMILIES:
      name += "-thin-" + "+".join(sparse_families)
    if families != pages.FAMILIES:
      name += "-" + "+".join(families)
  return PagesConfig(name=name, seed=int(seed), sizes=tuple((s, int(sizes[s])) for s in SPLITS),
                     grid=int(grid), permute_rows=bool(permute_rows), read_turn=bool(read_turn),
                     turns=int(turns), readout=bool(readout), families=tuple(families),
                     white_digits=int(white_digits), sparse_families=tuple(sparse_families))


class VisorPagesVqa(synthetic.RecordsBuilder, skip_registration=True):
  """Pages of 14 px cells with coarse / fine / control / interaction questions."""
  VERSION = tfds.core.Version("1.2.0")  # bump whenever generated content changes
  RELEASE_NOTES = {"1.0.0": "3-4 markers and 1-2 coloured digits per page.",
                   "1.1.0": "One marker and one coloured digit per page (fixed lookup keys).",
                   "1.2.0": "Relations point forward only (right of, below); sparse pages."}
  # `families` (a subset build) adds no new content: same version.

  def _record(self, split, index):
    c = self.builder_config
    if c.readout:
      return pages.readout_example(c.seed, split, index)[0]
    if c.families != pages.FAMILIES:  # the full split's records of these families, in order
      index = pages.family_index(c.seed, split, index, c.families)
    thin = c.white_digits and pages.slot(c.seed, split, index)[0] in c.sparse_families
    return pages.generate_example(c.seed, split, index, c.grid, c.permute_rows, c.read_turn,
                                  c.turns, c.white_digits if thin else 0)[0]


def _builder(data_dir, **params) -> VisorPagesVqa:
  return VisorPagesVqa(data_dir=os.fspath(data_dir), config=make_config(**params),
                       file_format="array_record")


def build(data_dir, *, seed=0, sizes=None, grid=8, permute_rows=False, read_turn=False,
          turns=1, readout=False, families=pages.FAMILIES, white_digits=0,
          sparse_families=pages.FAMILIES) -> str:
  """Builds the dataset under `data_dir` unless present (idempotent); returns `data_dir`.
  `readout`: the 1 x 1 readout variant (`readout_example`) instead of full pages;
  `families`: only the records of these families (`pages.family_index`); `white_digits` > 0:
  sparse pages with that many white digits (`pages.sparse_layout`) for the questions of
  `sparse_families` (the others keep full pages)."""
  builder = _builder(data_dir, seed=seed, sizes=sizes, grid=grid, permute_rows=permute_rows,
                     read_turn=read_turn, turns=turns, readout=readout, families=families,
                     white_digits=white_digits, sparse_families=sparse_families)
  if not builder.is_prepared():  # nothing to download; never ask GCS for a prebuilt copy
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.fspath(data_dir)


def records(split, data_dir, *, seed=0, sizes=None, grid=8, permute_rows=False,
            read_turn=False, turns=1, readout=False, families=pages.FAMILIES,
            white_digits=0, sparse_families=pages.FAMILIES) -> Records:
  """The built `split` (same parameters as `build`); raises if it was never built."""
  builder = _builder(data_dir, seed=seed, sizes=sizes, grid=grid, permute_rows=permute_rows,
                     read_turn=read_turn, turns=turns, readout=readout, families=families,
                     white_digits=white_digits, sparse_families=sparse_families)
  if not builder.is_prepared():
    raise FileNotFoundError(f"{builder.data_dir} is not built; call pages_build.build() first")
  return Records(builder.as_data_source(split=split))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", required=True)
  p.add_argument("--seed", type=int, default=0)
  for s in SPLITS:
    p.add_argument(f"--{s}", type=int, default=pages.DEFAULT_SIZES[s])
  p.add_argument("--grid", type=int, default=8)
  p.add_argument("--permute_rows", action="store_true")
  a = p.parse_args(argv)
  params = dict(seed=a.seed, sizes={s: getattr(a, s) for s in SPLITS}, grid=a.grid,
                permute_rows=a.permute_rows)
  build(a.data_dir, **params)
  synthetic.print_examples(records, a.data_dir, params, per_split=4)


if __name__ == "__main__":
  main()
