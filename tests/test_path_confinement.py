"""Untrusted paths stay confined: image paths in LLaVA records stay under the image root, and a
checkpoint index's shard names inside the checkpoint directory; non-safetensors shards are
refused by their header (data.conversations, data.pipeline, convert.safetensors_io)."""
import builtins
import io
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest

import hf_fixtures
from visor_jax.convert import safetensors_io
from visor_jax.data import conversations as conv
from visor_jax.data import pipeline


def png(seed=0) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(hf_fixtures.random_image(30, 40, seed)).save(buf, "PNG")
  return buf.getvalue()


def record(i, image) -> dict:
  return {"id": f"r{i}", "image": image, "conversations": [
      {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}


@pytest.fixture
def opened(monkeypatch):
  """Every path handed to open() / os.open() from now on, as a real path."""
  seen, real_open, real_os_open = [], builtins.open, os.open

  def spy_open(file, *a, **kw):
    if isinstance(file, (str, bytes, os.PathLike)):
      seen.append(os.path.realpath(file))
    return real_open(file, *a, **kw)

  def spy_os_open(path, *a, **kw):
    seen.append(os.path.realpath(path))
    return real_os_open(path, *a, **kw)

  monkeypatch.setattr(builtins, "open", spy_open)
  monkeypatch.setattr(os, "open", spy_os_open)
  return seen


def assert_never_opened_under(seen, directory):
  directory = os.path.realpath(directory)
  assert not [p for p in seen if os.path.commonpath([p, directory]) == directory]


# ----------------------------------------------------------------------------- image paths


@pytest.fixture
def corpus(tmp_path):
  """root/data.jsonl (legit and hostile records) next to outside/secret.png, a valid image
  that a hostile record must never load."""
  root, outside = tmp_path / "root", tmp_path / "outside"
  (root / "imgs").mkdir(parents=True)
  outside.mkdir()
  (root / "imgs" / "ok.png").write_bytes(png(1))
  (outside / "secret.png").write_bytes(png(2))
  os.symlink(outside / "secret.png", root / "imgs" / "evil.png")  # symlink out of the root
  os.symlink("ok.png", root / "imgs" / "alias.png")               # symlink within: fine
  secret = str(outside / "secret.png")
  legit = ["imgs/ok.png", "imgs/../imgs/ok.png", "imgs/alias.png", {"path": "imgs/ok.png"}]
  hostile = ["../outside/secret.png", "imgs/../../outside/secret.png", secret,
             {"path": secret}, "imgs/evil.png", "/etc/hostname", "../" * 12 + "etc/passwd",
             "imgs/ok\x00.png"]
  lines = [json.dumps(record(i, ref)) for i, ref in enumerate(legit + hostile)]
  (root / "data.jsonl").write_text("\n".join(lines) + "\n")
  return root, outside, len(legit), len(hostile)


def test_hostile_image_paths_are_refused_and_counted(corpus, tok, cfg, opened):
  root, outside, n_legit, n_hostile = corpus
  source = pipeline.JsonSource(root / "data.jsonl")  # no image_root: the JSON's directory
  it = pipeline.make_iterator(source, tok, cfg, batch_size=2, text_buckets=(96,), num_epochs=1,
                              shuffle=False, shard_index=0, shard_count=1, max_bad_fraction=1.0)
  batches = list(it)
  counts = dict(zip(pipeline.BAD_REASONS, sum(b["bad_counts"] for b in batches)))
  assert counts["unsafe_path"] == n_hostile
  assert sum(counts.values()) == n_hostile
  assert sum(b["sample_valid"].sum() for b in batches) == n_legit
  assert it.totals()["unsafe_path"] == n_hostile
  assert_never_opened_under(opened, outside)
  assert "/etc/hostname" not in opened and "/etc/passwd" not in opened


def test_explicit_image_root_confines_and_is_refused_before_open(corpus, opened):
  root, outside, _, _ = corpus
  loader = conv.ImageLoader(root / "imgs")  # data.image_root: tighter than the JSON's directory
  assert loader("ok.png").size == loader("../imgs/ok.png").size == (40, 30)
  for ref in ("../data.jsonl", "../../outside/secret.png", "evil.png", str(root / "imgs/ok.png")):
    with pytest.raises(conv.BadSample) as e:
      loader(ref)
    assert e.value.reason == "unsafe_path" and "image root" in str(e.value)
  assert_never_opened_under(opened, outside)
  assert os.path.realpath(root / "data.jsonl") not in opened


def test_symlinked_root_and_missing_file_inside_it(corpus, tmp_path):
  root, _, _, _ = corpus
  os.symlink(root, tmp_path / "link_to_root")  # the root itself may be a symlink
  loader = conv.ImageLoader(tmp_path / "link_to_root")
  assert loader("imgs/alias.png").size == (40, 30)
  with pytest.raises(conv.BadSample) as e:
    loader("imgs/absent.png")
  assert e.value.reason == "missing_image"


def test_without_a_root_paths_are_used_as_given(corpus):
  """`ImageLoader()` is for trusted callers (a command-line --image, the harness's paths)."""
  _, outside, _, _ = corpus
  assert conv.ImageLoader()(str(outside / "secret.png")).size == (40, 30)


def test_iterator_state_from_before_the_new_reason_restores(tok, cfg):
  """Data-iterator checkpoints written with fewer reasons (they are only appended) resume."""
  records = [record(i, png(i)) for i in range(6)] + [record(9, None)]
  kw = dict(batch_size=2, text_buckets=(96,), num_epochs=None, shard_index=0, shard_count=1,
            max_bad_fraction=1.0, shuffle_seed=1)
  it = pipeline.make_iterator(records, tok, cfg, **kw)
  for _ in range(4):
    next(it)
  state = _drop_last_count(it.get_state())
  restored = pipeline.make_iterator(records, tok, cfg, **kw)
  restored.set_state(state)
  assert restored.totals() == {**it.totals(), "unsafe_path": 0}
  np.testing.assert_array_equal(next(restored)["tokens"], next(it)["tokens"])


def _drop_last_count(state):
  """`state` as an older version wrote it: per-reason count lists one entry shorter."""
  if isinstance(state, dict):
    return {k: (v[:-1] if k in ("bad", "pending") and isinstance(v, list)
                and len(v) == len(pipeline.BAD_REASONS) else _drop_last_count(v))
            for k, v in state.items()}
  return state


# ----------------------------------------------------------------------------- safetensors


def write_index(directory, weight_map):
  (directory / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture
def ckpt(tmp_path):
  """ckpt/ with one good shard, and outside/, holding a valid shard no index may reach."""
  directory, outside = tmp_path / "ckpt", tmp_path / "outside"
  directory.mkdir()
  outside.mkdir()
  safetensors_io.save_file({"a": np.arange(3, dtype=np.float32)}, str(directory / "good.st"))
  safetensors_io.save_file({"b": np.ones(2, np.float32)}, str(outside / "secret.safetensors"))
  return directory, outside


@pytest.mark.parametrize("name", ["../outside/secret.safetensors", "SECRET_ABS", "link.st",
                                  "sub/../../outside/secret.safetensors"])
def test_shard_names_leaving_the_directory_are_refused(ckpt, name, opened):
  directory, outside = ckpt
  os.symlink(outside / "secret.safetensors", directory / "link.st")
  name = str(outside / "secret.safetensors") if name == "SECRET_ABS" else name
  write_index(directory, {"a": "good.st", "b": name})
  with pytest.raises(ValueError, match="outside the checkpoint directory") as e:
    safetensors_io.SafetensorsReader(str(directory))
  assert repr(name) in str(e.value) and safetensors_io.INDEX_FILE in str(e.value)
  assert_never_opened_under(opened, outside)


def test_hugging_face_cache_snapshot_links_to_its_blobs(tmp_path):
  """The hub cache's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
  repo = tmp_path / "models--org--name"
  (repo / "blobs").mkdir(parents=True)
  (repo / "snapshots" / "rev").mkdir(parents=True)
  safetensors_io.save_file({"a": np.arange(3, dtype=np.float32)}, str(repo / "blobs" / "h1"))
  (repo / "blobs" / "h2").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
  os.symlink("../../blobs/h1", repo / "snapshots" / "rev" / "model-1.safetensors")
  os.symlink("../../blobs/h2", repo / "snapshots" / "rev" / safetensors_io.INDEX_FILE)
  reader = safetensors_io.SafetensorsReader(str(repo / "snapshots" / "rev"))
  np.testing.assert_array_equal(reader.get("a"), np.arange(3, dtype=np.float32))


def _pickle_bytes():
  return pickle.dumps({"a": np.arange(3, dtype=np.float32)}, protocol=4)


@pytest.mark.parametrize("content", [
    _pickle_bytes(),                                          # a torch-style pickle
    np.random.default_rng(0).bytes(256),                      # garbage: a huge header length
    (4).to_bytes(8, "little") + b"\xff\xfe\x00\x01" + b"x",   # header not UTF-8
    (4).to_bytes(8, "little") + b"nope",                      # header not JSON
    (2).to_bytes(8, "little") + b"[]",                        # JSON, not an object
    (100).to_bytes(8, "little") + b"{}",                      # header longer than the file
    b"\x01\x02",                                              # shorter than the length field
], ids=["pickle", "garbage", "not_utf8", "not_json", "not_object", "short_header", "tiny"])
def test_non_safetensors_shard_is_named(ckpt, content):
  directory, _ = ckpt
  (directory / "bad.st").write_bytes(content)
  write_index(directory, {"a": "good.st", "b": "bad.st"})
  with pytest.raises(ValueError, match=r"not a safetensors file: .*bad\.st"):
    safetensors_io.SafetensorsReader(str(directory))


def test_header_entry_pointing_past_the_file_is_named(tmp_path):
  header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
  blob = len(header).to_bytes(8, "little") + header.encode() + b"\0" * 16
  (tmp_path / safetensors_io.SINGLE_FILE).write_bytes(blob)
  with pytest.raises(ValueError, match=r"not a safetensors file: .*bad header entry.*'a'"):
    safetensors_io.SafetensorsReader(str(tmp_path))


def test_reference_library_files_still_read(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int64)}
  st.save_file(tensors, str(tmp_path / safetensors_io.SINGLE_FILE), metadata={"format": "pt"})
  reader = safetensors_io.SafetensorsReader(str(tmp_path))
  for k, v in tensors.items():
    np.testing.assert_array_equal(reader.get(k), v)
