"""grain pipeline: bucketing, bad-sample accounting, checkpointing, sharding (data.pipeline)."""
import io
import json
import pickle

import ml_collections
import numpy as np
import PIL.Image
import pytest

import hf_fixtures
from visor_jax.data import pipeline

BUCKETS = (96, 160, 256)


def png(h, w, seed) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(hf_fixtures.random_image(h, w, seed)).save(buf, "PNG")
  return buf.getvalue()


def make_record(i: int, image) -> dict:
  """Short, medium and long prompts (buckets 96 / 160 / 256) with a unique answer."""
  question = "How many large shapes are there? " * (1, 3, 7)[i % 3]
  return {"id": f"r{i}", "image": image, "family": ("easy", "hard", None)[i % 3],
          "conversations": [{"from": "human", "value": "<image>\n" + question.strip()},
                            {"from": "gpt", "value": f"answer {i}"}]}


@pytest.fixture(scope="module")
def records():
  return [make_record(i, png(20 + 3 * i, 50 - i, i)) for i in range(24)]


def run(source, tok, cfg, **kw):
  kw = {"batch_size": 2, "text_buckets": BUCKETS, "num_epochs": 1, "shard_index": 0,
        "shard_count": 1, **kw}
  return pipeline.make_iterator(source, tok, cfg, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_static_bucket_shapes(records, tok, cfg):
  batches = list(run(records, tok, cfg))
  max_visual, max_crops = pipeline.visual_limits(cfg)
  lengths = set()
  for b in batches:
    B, T = b["tokens"].shape
    assert B == 2 and T in BUCKETS
    lengths.add(T)
    assert b["targets"].shape == (B, T) and b["targets"].dtype == np.int32
    assert b["vis_pos"].shape == (B, max_visual)
    assert b["pixels"].shape == (B, max_crops, 28, 28, 3)
    assert b["group"].shape == b["record_index"].shape == b["sample_valid"].shape == (B,)
    assert b["bad_counts"].shape == (len(pipeline.BAD_REASONS),)
    n = b["text_valid"].sum(1)[b["sample_valid"]]
    smaller = max([0] + [x for x in BUCKETS if x < T])
    assert np.all((n > smaller) & (n <= T))  # the smallest bucket that fits
    assert np.all(b["targets"][~b["text_valid"]] == -1)
  assert lengths == set(BUCKETS)
  valid = np.concatenate([b["record_index"][b["sample_valid"]] for b in batches])
  assert sorted(valid) == list(range(len(records)))
  fam = {int(i): str(f) for b in batches for i, f, v in
         zip(b["record_index"], b["group"], b["sample_valid"]) if v}
  assert [fam[i] for i in range(3)] == ["easy", "hard", ""]  # the record's family, '' if none


def write_bad_jsonl(tmp_path, n_good=10):
  """One of each bad kind among good records; images are files under tmp_path/imgs."""
  (tmp_path / "imgs").mkdir()
  for i in range(n_good):
    (tmp_path / "imgs" / f"{i}.png").write_bytes(png(30, 20 + i, i))
  (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG not really")
  lines = [json.dumps(make_record(i, f"imgs/{i}.png")) for i in range(n_good)]
  bad = [make_record(100, "imgs/missing.png"), make_record(101, "imgs/corrupt.png"),
         {**make_record(102, "imgs/0.png"), "conversations": [{"from": "bot", "value": "x"}]},
         {**make_record(103, "imgs/0.png"),
          "conversations": [{"from": "human", "value": "<image>\nhello"}]},
         {**make_record(104, "imgs/0.png"), "conversations": [
             {"from": "human", "value": "<image>\n" + "word " * 400},
             {"from": "gpt", "value": "ok"}]}]
  lines += [json.dumps(r) for r in bad] + ["{this is not json", ""]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_bad_samples_skipped_and_counted(tok, cfg, tmp_path):
  source = pipeline.JsonSource(write_bad_jsonl(tmp_path))
  assert len(source) == 16  # blank lines are not records
  it = run(source, tok, cfg, max_bad_fraction=1.0)
  batches = list(it)
  counts = dict(zip(pipeline.BAD_REASONS, sum(b["bad_counts"] for b in batches)))
  assert counts == {"missing_image": 1, "corrupt_image": 1, "malformed": 2,
                    "no_assistant_turn": 1, "too_long": 1, "unsafe_path": 0}
  assert sum(b["sample_valid"].sum() for b in batches) == 10
  assert it.totals() == {"seen": 16, **counts}


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_an_overlong_answer_is_truncated_or_skipped_and_counted(tok, cfg, overlong):
  """A 100k-word answer: cut to the text bucket and flagged `truncated` (data.overlong=
  'truncate'), or skipped as `too_long` ('skip'); never trained on silently."""
  long = {**make_record(200, png(30, 20, 0)), "conversations": [
      {"from": "human", "value": "<image>\nDescribe."},
      {"from": "gpt", "value": "word " * 100_000}]}
  batches = list(run([make_record(0, png(30, 20, 0)), long, make_record(1, png(30, 21, 1))],
                     tok, cfg, max_bad_fraction=1.0, overlong=overlong))
  counts = dict(zip(pipeline.BAD_REASONS, sum(b["bad_counts"] for b in batches)))
  valid = sum(int(b["sample_valid"].sum()) for b in batches)
  truncated = sum(int((b["truncated"] & b["sample_valid"]).sum()) for b in batches)
  if overlong == "truncate":
    assert (valid, truncated, counts["too_long"]) == (3, 1, 0)
  else:
    assert (valid, truncated, counts["too_long"]) == (2, 0, 1)


def test_overlong_policy_is_validated():
  with pytest.raises(ValueError, match="data.overlong"):
    pipeline.data_config({"overlong": "clip"})


def test_too_many_bad_samples_raise(tok, cfg, tmp_path):
  source = pipeline.JsonSource(write_bad_jsonl(tmp_path))
  it = run(source, tok, cfg, max_bad_fraction=0.1, min_records_for_bad_check=8)
  with pytest.raises(pipeline.TooManyBadSamples, match=r"max_bad_fraction") as e:
    list(it)
  assert any(f"{r}=" in str(e.value) for r in pipeline.BAD_REASONS)


def test_checkpoint_resume_gives_identical_batches(records, tok, cfg):
  kw = dict(num_epochs=None, shuffle_seed=3)  # training: reshuffled, repeated forever
  it = run(records, tok, cfg, **kw)
  take(it, 3)
  state = it.get_state()
  while not any(state["parent"]["buffers"]):  # make sure half-filled buckets are restored too
    take(it, 1)
    state = it.get_state()
  state = json.loads(json.dumps(state))  # checkpointable as JSON
  expected = take(it, 12)  # crosses an epoch boundary (24 records, 2 per batch)
  resumed = run(records, tok, cfg, **kw)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 12), expected)
  # Another epoch is shuffled differently.
  a = [b["record_index"] for b in take(run(records, tok, cfg, num_epochs=2), 24)]
  assert not np.array_equal(np.concatenate(a[:12]), np.concatenate(a[12:]))


def test_checkpoint_with_worker_processes(records, tok, cfg):
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  kw = dict(num_epochs=None, num_workers=2, read_threads=0)
  it = run(records, tok, cfg, **kw)
  take(it, 2)
  state = it.get_state()
  expected = take(it, 3)
  it.close()
  resumed = run(records, tok, cfg, **kw)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 3), expected)
  resumed.close()


def test_shards_are_disjoint_and_cover(records, tok, cfg):
  seen = []
  for shard in (0, 1):
    batches = run(records, tok, cfg, shard_index=shard, shard_count=2)
    seen.append({int(i) for b in batches for i, v in zip(b["record_index"], b["sample_valid"])
                 if v})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(len(records)))


def test_json_list_source_and_config_dict(records, tok, cfg, tmp_path):
  (tmp_path / "a.png").write_bytes(png(30, 30, 0))
  data = [make_record(i, "a.png") for i in range(5)] + ["not a record"]
  (tmp_path / "d.json").write_text(json.dumps(data))
  source = pickle.loads(pickle.dumps(pipeline.JsonSource(tmp_path / "d.json")))
  c = ml_collections.ConfigDict(dict(batch_size=4, text_buckets=[96, 160, 256], num_epochs=1,
                                     shuffle=False, max_bad_fraction=0.5, unrelated_key=1))
  batches = list(pipeline.make_iterator(source, tok, cfg, c, shard_index=0, shard_count=1))
  assert sum(b["sample_valid"].sum() for b in batches) == 5
  assert sum(b["bad_counts"][pipeline.BAD_REASONS.index("malformed")] for b in batches) == 1
  with pytest.raises(ValueError, match="unknown keys"):
    pipeline.data_config(c, strict=True)
  with pytest.raises(ValueError, match="text_buckets"):
    pipeline.data_config(text_buckets=(128, 64))
  with pytest.raises(ValueError, match="max_text_len"):
    pipeline.data_config(text_buckets=(64,), max_text_len=100)


def test_global_batch_and_throughput(records, tok, cfg):
  import jax
  from visor_jax import sharding
  it = run(records, tok, cfg, batch_size=8, num_epochs=None)
  assert pipeline.measure_throughput(it, 2) > 0
  local = next(it)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  batch = sharding.to_global(local, mesh, pipeline.HOST_FIELDS)
  assert isinstance(batch["tokens"], jax.Array) and batch["tokens"].shape == local["tokens"].shape
  assert len(batch["tokens"].addressable_shards) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(batch["targets"]), local["targets"])
  assert not set(pipeline.HOST_FIELDS) & set(batch)  # host statistics never reach devices
  assert local["group"].dtype.kind == "U"


def test_image_spec_normalises_the_pixels(records, tok, cfg):
  """The run's image processor (e.g. an `init_from` checkpoint's CLIP mean/std) is the one the
  batches are normalised with, not the geometry's 0.5 default."""
  from visor_jax.data import inputs
  mean, std = np.array([0.48, 0.46, 0.41]), np.array([0.27, 0.26, 0.28])
  clip = inputs.processor_spec(cfg, image_mean=tuple(mean), image_std=tuple(std))
  default = next(run(records[:4], tok, cfg))
  ours = next(run(records[:4], tok, cfg, image_spec=clip))
  np.testing.assert_array_equal(ours["record_index"], default["record_index"])
  rgb = default["pixels"][0, 0] * 0.5 + 0.5  # each sample's first crop is a real view
  np.testing.assert_allclose(ours["pixels"][0, 0], (rgb - mean) / std, atol=1e-5)
