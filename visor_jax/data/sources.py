"""Where a run's records come from: `config.data` → a source per split, and its iterators.

Three sources: the embedded synthetic or pages dataset (built under the workdir on first use,
deterministic, so every host may build its own copy) or LLaVA-format JSON. The trainer, router
training and the evaluation entry point all read data through here, so they agree on which
records a split holds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os

import ml_collections

from visor_jax import paths
from visor_jax.config_lib import ModelConfig
from visor_jax.data import curriculum, pages, pages_build, pipeline, preprocess, synthetic
from visor_jax.data.tokenizer import Tokenizer

SOURCES = ("synthetic", "pages", "json")
log = logging.getLogger(__name__)


# Where the embedded datasets of a run whose workdir is a URL (gs://) are built: tfds writes
# and reads them as array_record files, which (without TensorFlow) must be local. The builds
# are deterministic and named by their parameters, so runs and hosts may share this cache.
LOCAL_DATA_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "visor_jax", "embedded_data")


def synthetic_dir(data: ml_collections.ConfigDict, workdir: str) -> str:
  """`data.synthetic_dir` (local: the embedded datasets are array_record files, so a URL is
  refused), else `LOCAL_DATA_CACHE` for a `gs://` workdir, else `<workdir>/synthetic_data`."""
  if data.get("synthetic_dir"):
    if paths.is_remote(data.synthetic_dir):
      raise ValueError(f"config.data.synthetic_dir={data.synthetic_dir}: the embedded datasets "
                       "are array_record files, which need a local directory (without "
                       "TensorFlow); leave it unset to build them in " + LOCAL_DATA_CACHE)
    return data.synthetic_dir
  if paths.is_remote(workdir):
    return LOCAL_DATA_CACHE
  return os.path.join(workdir, "synthetic_data")


def synthetic_params(data: ml_collections.ConfigDict) -> dict:
  """The generation parameters of the synthetic dataset a `config.data` describes."""
  return dict(seed=data.synthetic_seed, sizes=dict(data.synthetic_sizes),
              min_side=data.synthetic_min_side, max_side=data.synthetic_max_side)


def pages_params(data: ml_collections.ConfigDict) -> dict:
  """The generation parameters of the pages dataset a `config.data` describes (it shares
  `synthetic_dir`, `synthetic_seed` and `synthetic_sizes`; builds never collide on disk)."""
  families = data.get("pages_families", "")
  return dict(seed=data.synthetic_seed, sizes=dict(data.synthetic_sizes),
              grid=data.get("pages_grid", 8), read_turn=data.get("pages_read_turn", False),
              turns=data.get("pages_turns", 1), readout=data.get("pages_readout", False),
              families=tuple(families.split(",")) if families else pages.FAMILIES,
              white_digits=data.get("pages_white_digits", 0))


def question_format(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`data` with the training-only turns off (pages: no reading turn, one question per
  record), so every record is asked as at evaluation: what the router's pseudo-labels need
  (it routes at the question's last prompt token)."""
  out = ml_collections.ConfigDict(data.to_dict())
  if out.get("source") == "pages":  # and full pages, not the curriculum's
    out.pages_read_turn, out.pages_turns, out.pages_curriculum = False, 1, ""
  return out


# The embedded datasets: name → (module with build/records/corpus, its parameters' reader).
EMBEDDED = {"synthetic": (synthetic, synthetic_params), "pages": (pages_build, pages_params)}


def embedded(data: ml_collections.ConfigDict):
  """(dataset module, generation parameters) of an embedded source; None for JSON."""
  if data.get("source") not in EMBEDDED:
    return None
  module, params = EMBEDDED[data.source]
  return module, params(data)


def corpus(data: ml_collections.ConfigDict) -> list[str]:
  """Text the embedded tokenizer is trained on: the run's embedded dataset's questions and
  answers (so its answers are single tokens); the synthetic dataset's for other sources."""
  found = embedded(data)
  return (found[0] if found else synthetic).corpus()


class _DropTfdsChatter(logging.Filter):
  """tfds logs through absl below ERROR on every builder it makes ("Using custom data
  configuration", "Variant folder ... has no dataset_info.json"): noise for the embedded
  datasets, whose builders are made over and over and always carry a custom config."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


def quiet_tfds() -> None:
  """No tfds progress bars (escape codes in logs) and no tfds info/warnings below ERROR."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropTfdsChatter) for f in absl_logger.filters):
    absl_logger.addFilter(_DropTfdsChatter())


def source_for(data: ml_collections.ConfigDict, split: str, workdir: str):
  """The records of one split (None when a JSON run has no file for it). With a pages
  curriculum, train is its phases' builds in order (`data/curriculum.py`)."""
  found = embedded(data)
  if found is not None:
    quiet_tfds()
    module, params = found
    directory = synthetic_dir(data, workdir)
    phases = curriculum.parse(data.get("pages_curriculum", "")) if split == "train" else ()
    if phases and data.source == "pages":
      import jax  # the global batch: every host reads the same phase at the same step
      per_step = data.batch_size * jax.process_count()
      parts = []
      for phase in phases:
        phase_params = curriculum.phase_params(params, phase, phase.steps * per_step)
        with contextlib.redirect_stdout(io.StringIO()):  # tfds prints two lines per build
          module.build(directory, **phase_params)
        parts.append(module.records(split, directory, **phase_params))
        log.info("curriculum phase %s: %d steps, %d records", phase.label, phase.steps,
                 len(parts[-1]))
      return curriculum.Concatenated(parts)
    module.build(directory, **params)  # a no-op when already built
    return module.records(split, directory, **params)
  if data.source == "json":
    path = data.json_path if split == "train" else data.eval_json_path
    return pipeline.JsonSource(path, data.image_root) if path else None
  raise ValueError(f"data.source={data.source!r} is not one of {SOURCES}.")


def check_paths(data: ml_collections.ConfigDict) -> None:
  """A JSON run's files exist, else an error naming the config field (checked before anything
  is built or compiled). Embedded sources build their own data: nothing to check."""
  if data.get("source") != "json":
    if data.get("synthetic_dir"):
      synthetic_dir(data, "")  # a URL is refused here, before anything is built
    return
  if not data.json_path:
    raise ValueError("config.data.json_path is not set: source='json' trains on a LLaVA-format "
                     ".json/.jsonl file.")
  for field, isdir in (("json_path", False), ("eval_json_path", False),
                       ("eval_questions", False), ("image_root", True)):
    path = data.get(field)
    if path and not (paths.isdir if isdir else paths.isfile)(path):
      kind = "directory" if isdir else "file"
      raise FileNotFoundError(f"config.data.{field}={path}: no such {kind}.")


def pipeline_kwargs(data: ml_collections.ConfigDict) -> dict:
  """`config.data` as the pipeline's keyword arguments (0 = derive from the model)."""
  d = data.to_dict()
  d["max_visual"] = d.get("max_visual") or None
  d["max_crops"] = d.get("max_crops") or None
  return d


def train_iterator(config, cfg: ModelConfig, tokenizer: Tokenizer, workdir: str,
                   image_spec: preprocess.ImageProcessorSpec | None = None):
  """Shuffled, repeated, host-sharded, checkpointable training batches (images preprocessed
  as `image_spec` says; None: the default for the geometry). A pages curriculum is read in
  order, not shuffled: its phases must follow one another."""
  in_order = bool(curriculum.check(config))
  return pipeline.make_iterator(source_for(config.data, "train", workdir), tokenizer, cfg,
                                pipeline_kwargs(config.data), num_epochs=None,
                                shuffle=not in_order, image_spec=image_spec)


def eval_batches(config, cfg: ModelConfig, tokenizer: Tokenizer, workdir: str, split: str =
                 "validation", limit: int | None = None,
                 image_spec: preprocess.ImageProcessorSpec | None = None) -> list[dict]:
  """The first `limit` (default `config.eval_batches`) batches of one in-order pass over
  `split`; [] when the run has no such split."""
  source = source_for(config.data, split, workdir)
  if source is None:
    return []
  limit = config.eval_batches if limit is None else limit
  it = pipeline.make_iterator(source, tokenizer, cfg, pipeline_kwargs(config.data),
                              num_epochs=1, shuffle=False, num_workers=0,
                              image_spec=image_spec)
  out = []
  for batch in it:
    if len(out) == limit:
      break
    batch.pop("bad_counts", None)
    out.append(batch)
  return out
