"""grain input pipeline: LLaVA records → static-shape, bucketed, checkpointable batches.

  source ─ shuffle(seed, per epoch) ─ repeat(epochs) ─ [host shard] ─ encode (map, by index)
        ─ to_iter_dataset ─ bucket + batch ─ mp_prefetch(workers) ─ bad-fraction guard

Static shapes: each example goes to the smallest `text_buckets` entry that holds its text
tokens; a batch is `batch_size` examples of one bucket, padded to that bucket's text length
and to the fixed `max_visual` / `max_crops`, so the train step compiles at most once per bucket.
At the end of a finite pass the partly filled buckets are flushed, padded with empty rows
(`sample_valid` False, targets -1).

Bad input never stops a run: a `BadSample` is skipped, counted per reason (`BAD_REASONS`) and
logged (rate-limited). Workers are separate processes, so the counts travel inside the batches
(`bad_counts`: what was skipped while that batch was assembled). Too many bad samples
(`max_bad_fraction`, after `min_records_for_bad_check` records) raise `TooManyBadSamples`.

Checkpointing: the batcher's state is its parent's state plus the *indices* of the examples
waiting in its buckets; `set_state` re-encodes those by index (encoding is deterministic), so a
restored iterator yields exactly the batches the original would have (same `num_workers`).
Hosts shard after the repeat, so for a finite pass hosts may get one record more or less and a
different number of batches: multi-host evaluation must pad / agree on a step count itself.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from visor_jax.config_lib import ModelConfig
from visor_jax.data import anyres, conversations, inputs, preprocess
from visor_jax.data.conversations import (  # noqa: F401 (re-exported: the pipeline's API)
    BAD_REASONS, BadRecord, BadSample, Example, JsonSource)
from visor_jax.data.tokenizer import Tokenizer

# Host-side fields of a batch, never sent to devices: per-host bad-sample counts, and each
# row's question group (the record's `family`, '' when it has none) for per-group metrics.
HOST_FIELDS = ("bad_counts", "group")
log = logging.getLogger(__name__)


class TooManyBadSamples(RuntimeError):
  """The data is broken, not just noisy: stop instead of training on the remainder."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The pipeline's knobs (all per host)."""
  batch_size: int = 8                   # examples per batch on this host
  text_buckets: tuple[int, ...] = (64, 128, 256)  # static padded text lengths
  max_visual: int | None = None         # static visual-token count (None: bound from the model)
  max_crops: int | None = None          # static crop count (None: 1 + largest AnyRes grid)
  max_text_len: int | None = None       # text limit (None: largest bucket)
  overlong: str = "truncate"            # text past max_text_len: 'truncate' (kept, cut, counted
                                        # as truncated) | 'skip' (bad sample 'too_long')
  num_workers: int = 0                  # grain worker processes (0: in-process)
  shuffle_seed: int = 0                 # global shuffle seed (reshuffled every epoch)
  shuffle: bool = True
  num_epochs: int | None = None         # None: repeat forever (training); 1: one pass (eval)
  max_bad_fraction: float = 0.05        # fail if more than this fraction of records is bad
  min_records_for_bad_check: int = 200  # ... once at least this many records were seen
  system_prompt: str | None = conversations.DEFAULT_SYSTEM_PROMPT
  image_root: str | None = None         # relative image paths resolve here (else: source's)
  read_threads: int = 2                 # threads encoding records inside each worker
  read_buffer: int = 16                 # records encoded ahead inside each worker
  worker_buffer: int = 2                # batches each worker process keeps ready


def data_config(c: ml_collections.ConfigDict | dict | DataConfig | None = None, *,
                strict: bool = False, **overrides) -> DataConfig:
  """A validated `DataConfig` from `config.data` (unknown keys ignored unless `strict`)."""
  if isinstance(c, DataConfig):
    c = dataclasses.asdict(c)
  c = dict(c.to_dict() if isinstance(c, ml_collections.ConfigDict) else (c or {}))
  c.update(overrides)
  names = {f.name for f in dataclasses.fields(DataConfig)}
  if strict and set(c) - names:
    raise ValueError(f"data config: unknown keys {sorted(set(c) - names)}.")
  kw = {k: v for k, v in c.items() if k in names}
  if "text_buckets" in kw:
    kw["text_buckets"] = tuple(int(b) for b in kw["text_buckets"])
  d = DataConfig(**kw)
  buckets = d.text_buckets
  if not buckets or any(b <= 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
    raise ValueError(f"data.text_buckets={buckets}: need increasing ints > 1.")
  if d.max_text_len is not None and not 2 <= d.max_text_len <= buckets[-1]:
    raise ValueError(f"data.max_text_len={d.max_text_len} must be in [2, {buckets[-1]}] "
                     "(the largest text bucket).")
  if d.overlong not in ("truncate", "skip"):
    raise ValueError(f"data.overlong={d.overlong!r} must be 'truncate' or 'skip'.")
  for name, low in (("batch_size", 1), ("max_visual", 1), ("max_crops", 1),
                    ("min_records_for_bad_check", 1), ("num_workers", 0), ("read_threads", 0),
                    ("read_buffer", 0), ("worker_buffer", 0)):
    value = getattr(d, name)
    if value is not None and (not isinstance(value, int) or value < low):
      raise ValueError(f"data.{name}={value!r} must be an int >= {low}.")
  if not 0 <= d.max_bad_fraction <= 1:
    raise ValueError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1].")
  if not 0 <= d.shuffle_seed < 2**32:
    raise ValueError(f"data.shuffle_seed={d.shuffle_seed} must be in [0, 2**32).")
  if d.num_epochs is not None and d.num_epochs <= 0:
    raise ValueError(f"data.num_epochs={d.num_epochs} must be positive or None.")
  return d


def visual_limits(cfg: ModelConfig) -> tuple[int, int]:
  """(max_visual, max_crops) bounds for one AnyRes image under `cfg`.

  Grid tokens stay below 1.21 * N * g^2 (`anyres_max_N` down-samples beyond a 1.1 side ratio),
  plus one newline per feature row and the g^2 base-view tokens.
  """
  g = cfg.vision.grid
  n = anyres.parse_vision_aspect_ratio(cfg.vision_aspect_ratio)
  s = cfg.vision.image_size
  rows = max(h // s for h, _ in cfg.image_grid_pinpoints) * g
  full = max((h // s) * g * ((w // s) * g + 1) for h, w in cfg.image_grid_pinpoints)
  return g * g + min(full, int(1.21 * n * g * g) + rows), cfg.max_num_crops_per_image


# ----------------------------------------------------------------------------- encoding


def _tag_with_source_index(num_records: int, index: int, record: Any) -> tuple[int, Any]:
  """Below shuffle/repeat, `index` is epoch * num_records + the record's source index."""
  return index % num_records, record


class _Encoder:
  """(key, (source index, record)) → (key, source index, Example | None, bad reason | None).

  Never raises on bad data: it reports the reason instead.
  """

  def __init__(self, tokenizer: Tokenizer, cfg: ModelConfig, d: DataConfig, image_root,
               image_spec: preprocess.ImageProcessorSpec | None = None):
    self.tokenizer, self.cfg, self.d, self.image_spec = tokenizer, cfg, d, image_spec
    self.loader = conversations.ImageLoader(image_root)
    self.max_text_len = d.max_text_len or d.text_buckets[-1]
    self.num_bad = self.num_truncated = 0

  def __call__(self, key: int, tagged: tuple[int, Any]):
    index, record = tagged
    try:
      ex = conversations.encode_record(
          record, self.tokenizer, self.cfg, self.loader, max_text_len=self.max_text_len,
          system_prompt=self.d.system_prompt, max_visual=self.d.max_visual,
          max_crops=self.d.max_crops, spec=self.image_spec, overlong=self.d.overlong)
    except BadSample as e:
      return key, index, None, self._bad(e.reason, f"{_record_id(record)}: {e}")
    except Exception as e:  # noqa: BLE001 — odd data must not kill a long run; the guard and
      # the log still surface a systematic failure (it shows up as a high 'malformed' rate).
      return key, index, None, self._bad("malformed", f"{_record_id(record)}: unexpected "
                                    f"{type(e).__name__}: {e}")
    if ex.truncated:
      self.num_truncated += 1
      if _should_log(self.num_truncated):
        log.warning("truncated %d sample(s) to %d text tokens (latest: %s).",
                    self.num_truncated, self.max_text_len, ex.id)
    return key, index, ex, None

  def _bad(self, reason: str, message: str) -> str:
    self.num_bad += 1
    if _should_log(self.num_bad):
      log.warning("skipping bad sample #%d in this process (%s) %s", self.num_bad, reason,
                  message)
    return reason


def _record_id(record: Any) -> str:
  return f"record {record.get('id')!r}" if isinstance(record, dict) else "record"


def _should_log(count: int) -> bool:
  """Rate limit: the first 10 occurrences, then every power of two."""
  return count <= 10 or count & (count - 1) == 0


def check_bad_fraction(bad_counts: Sequence[int], seen: int, max_bad_fraction: float,
                       min_records: int) -> None:
  """Raises `TooManyBadSamples` naming each reason's count once the bad rate is too high."""
  bad = int(sum(bad_counts))
  if seen >= min_records and bad > max_bad_fraction * seen:
    detail = ", ".join(f"{r}={int(n)}" for r, n in zip(BAD_REASONS, bad_counts) if n)
    raise TooManyBadSamples(
        f"{bad} of {seen} records were bad ({bad / seen:.1%} > max_bad_fraction="
        f"{max_bad_fraction:.1%}): {detail}. Fix the data or raise data.max_bad_fraction.")


# ----------------------------------------------------------------------------- batching


class _Batcher:
  """Pads a list of examples of one bucket into the batch dict (numpy)."""

  def __init__(self, cfg: ModelConfig, d: DataConfig, max_visual: int, max_crops: int):
    self.d, self.max_visual, self.max_crops = d, max_visual, max_crops
    s = cfg.vision.image_size
    z = lambda *shape, dtype=np.int32: np.zeros(shape, dtype)  # noqa: E731
    self.empty = inputs.Sample(z(0), z(0), z(0, s, s, 3, dtype=np.float32), z(0, 4),
                               z(0, 4, dtype=np.float32), z(0, dtype=bool), z(0))

  def bucket(self, ex: Example) -> int:
    return int(np.searchsorted(self.d.text_buckets, len(ex.sample.tokens)))

  def __call__(self, bucket: int, examples: Sequence[Example], record_index: Sequence[int],
               bad_counts: np.ndarray) -> dict[str, np.ndarray]:
    b, t = self.d.batch_size, self.d.text_buckets[bucket]
    pad = b - len(examples)
    column = lambda values, fill, dtype: np.asarray([*values, *[fill] * pad], dtype)  # noqa: E731
    samples = [ex.sample for ex in examples] + [self.empty] * pad
    batch = inputs.collate(samples, text_len=t, num_visual=self.max_visual,
                           num_crops=self.max_crops)
    batch["targets"] = np.full((b, t), conversations.IGNORE, np.int32)
    for i, ex in enumerate(examples):
      batch["targets"][i, :len(ex.targets)] = ex.targets
    batch["group"] = column([ex.family or "" for ex in examples], "", np.str_)
    batch["record_index"] = column(record_index, -1, np.int32)
    batch["sample_valid"] = column([True] * len(examples), False, bool)
    batch["truncated"] = column([ex.truncated for ex in examples], False, bool)
    batch["bad_counts"] = bad_counts.astype(np.int32)
    return batch


class _Wrap(grain.IterDataset):
  """An `IterDataset` whose iterator is `factory(parent iterator)` (one per worker process)."""

  def __init__(self, parent: grain.IterDataset, factory):
    super().__init__(parent)
    self._factory = factory

  def __iter__(self):
    return self._factory(self._parent.__iter__())


class _BucketBatchIterator(grain.DatasetIterator):
  """Per-bucket buffers → full batches; counts bad samples; flushes at the end of the data."""

  def __init__(self, parent: grain.DatasetIterator, items: grain.MapDataset, batcher: _Batcher):
    super().__init__(parent)
    self._items, self._batcher = items, batcher
    self._reset()

  def _reset(self):
    # Per bucket: (key into `items`, source index, example) waiting for a full batch.
    self._buffers: list[list[tuple[int, int, Example]]] = [
        [] for _ in self._batcher.d.text_buckets]
    self._pending = np.zeros(len(BAD_REASONS), np.int64)  # bad since the last batch
    self._bad = np.zeros(len(BAD_REASONS), np.int64)      # bad in this worker, ever
    self._seen = 0

  def __next__(self) -> dict[str, np.ndarray]:
    d = self._batcher.d
    while True:
      try:
        key, index, ex, reason = next(self._parent)
      except StopIteration:
        break
      self._seen += 1
      if reason is not None:
        self._pending[BAD_REASONS.index(reason)] += 1
        self._bad[BAD_REASONS.index(reason)] += 1
        # Checked here too: a worker whose data is all bad would otherwise never emit a batch.
        check_bad_fraction(self._bad, self._seen, d.max_bad_fraction, d.min_records_for_bad_check)
        continue
      bucket = self._batcher.bucket(ex)
      self._buffers[bucket].append((key, index, ex))
      if len(self._buffers[bucket]) == d.batch_size:
        return self._emit(bucket)
    for bucket, buf in enumerate(self._buffers):  # end of data: flush partial batches
      if buf:
        return self._emit(bucket)
    if self._pending.any():  # only skipped records since the last batch: report them
      return self._emit(0)
    raise StopIteration

  def _emit(self, bucket: int) -> dict[str, np.ndarray]:
    buf, self._buffers[bucket] = self._buffers[bucket], []
    batch = self._batcher(bucket, [ex for *_, ex in buf], [i for _, i, _ in buf], self._pending)
    self._pending = np.zeros_like(self._pending)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(),
            "buffers": [[int(k) for k, *_ in buf] for buf in self._buffers],
            "pending": [int(x) for x in self._pending], "bad": [int(x) for x in self._bad],
            "seen": int(self._seen)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._reset()
    for bucket, keys in enumerate(state["buffers"]):
      for key in keys:  # re-encode what was waiting (deterministic, so the same examples)
        _, index, ex, _ = self._items[key]
        self._buffers[bucket].append((key, index, ex))
    _restore_counts(self._pending, state["pending"])
    _restore_counts(self._bad, state["bad"])
    self._seen = int(state["seen"])


def _restore_counts(counts: np.ndarray, saved: Sequence[int]) -> None:
  """Per-reason counts from a checkpoint; one written before a reason was added (reasons are
  only ever appended) has fewer entries, and the new reasons start at zero."""
  counts[:] = 0
  counts[:len(saved)] = saved


class _GuardIterator(grain.DatasetIterator):
  """Main process: totals over all workers; raises `TooManyBadSamples`. `totals()` for logs."""

  def __init__(self, parent: grain.DatasetIterator, d: DataConfig):
    super().__init__(parent)
    self._d = d
    self._bad = np.zeros(len(BAD_REASONS), np.int64)
    self._seen = 0

  def __next__(self):
    batch = next(self._parent)
    self._bad += batch["bad_counts"]
    self._seen += int(batch["sample_valid"].sum() + batch["bad_counts"].sum())
    check_bad_fraction(self._bad, self._seen, self._d.max_bad_fraction,
                       self._d.min_records_for_bad_check)
    return batch

  def totals(self) -> dict[str, int]:
    """Records seen and bad counts per reason so far (all workers of this host)."""
    return {"seen": int(self._seen), **{r: int(n) for r, n in zip(BAD_REASONS, self._bad)}}

  def get_state(self):
    return {"parent": self._parent.get_state(), "bad": [int(x) for x in self._bad],
            "seen": int(self._seen)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    _restore_counts(self._bad, state["bad"])
    self._seen = int(state["seen"])


# ----------------------------------------------------------------------------- public API


def make_dataset(source: Sequence[Any], tokenizer: Tokenizer, model_cfg: ModelConfig,
                 data_cfg: ml_collections.ConfigDict | dict | DataConfig | None = None, *,
                 shard_index: int | None = None, shard_count: int | None = None,
                 image_spec: preprocess.ImageProcessorSpec | None = None,
                 **overrides) -> grain.IterDataset:
  """The batched `grain.IterDataset`; `iter()` it for a checkpointable iterator.

  `source`: a `JsonSource` or any random-access sequence of record dicts. Sharding defaults to
  `jax.process_index()` of `jax.process_count()`. `image_spec`: how images are preprocessed
  (the run's `runs.experiment_image_spec`; None: the default for the geometry).
  """
  d = data_config(data_cfg, **overrides)
  if tokenizer.image_token_id != model_cfg.image_token_id:
    raise ValueError(f"tokenizer's <image> id {tokenizer.image_token_id} differs from "
                     f"model.image_token_id={model_cfg.image_token_id}.")
  if len(source) == 0:
    raise ValueError("data source is empty.")
  max_visual, max_crops = visual_limits(model_cfg)
  d = dataclasses.replace(d, max_visual=max_visual if d.max_visual is None else d.max_visual,
                          max_crops=max_crops if d.max_crops is None else d.max_crops)
  if shard_index is None or shard_count is None:
    import jax  # only for the host's identity
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, {shard_count}).")

  ds = grain.MapDataset.source(source).map_with_index(
      functools.partial(_tag_with_source_index, len(source)))
  if d.shuffle:
    ds = ds.shuffle(seed=d.shuffle_seed)
  ds = ds.repeat(d.num_epochs)
  ds = ds[shard_index::shard_count]
  image_root = d.image_root or getattr(source, "image_root", None)
  items = ds.map_with_index(_Encoder(tokenizer, model_cfg, d, image_root, image_spec))
  it_ds = items.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads,
                                                  prefetch_buffer_size=d.read_buffer))
  batcher = _Batcher(model_cfg, d, d.max_visual, d.max_crops)
  it_ds = _Wrap(it_ds, functools.partial(_BucketBatchIterator, items=items, batcher=batcher))
  it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=d.num_workers, per_worker_buffer_size=d.worker_buffer))
  return _Wrap(it_ds, functools.partial(_GuardIterator, d=d))


def make_iterator(*args, **kwargs) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`: has get_state / set_state / totals()."""
  return iter(make_dataset(*args, **kwargs))


def measure_throughput(iterator: Iterator[Any], n_batches: int) -> float:
  """Batches per second over `n_batches`, after one warm-up batch (worker start-up excluded)."""
  next(iterator)
  start = time.perf_counter()
  for _ in range(n_batches):
    next(iterator)
  return n_batches / (time.perf_counter() - start)
