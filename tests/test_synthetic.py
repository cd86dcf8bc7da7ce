"""Synthetic VQA dataset: determinism, record contract, exact ground truth, no TensorFlow."""
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from visor_jax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARAMS = dict(seed=0, sizes={"train": 20, "validation": 6, "test": 6}, min_side=256, max_side=384)
KEYS = {"id", "image", "conversations", "family", "kind", "answer"}

# Builds through the CLI entry point in a fresh process with sockets disabled, then checks
# TensorFlow was never imported: a separate process also gets a different protobuf map
# hash seed, which is what made naive tfds builds non-reproducible.
_SUBPROCESS = r"""
import runpy, socket, sys
def _no_network(*a, **k):
  raise OSError("network access attempted")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = _no_network
data_dir = sys.argv[1]
sys.argv = ["synthetic", "--data_dir", data_dir, "--seed", "0", "--train", "20",
            "--validation", "6", "--test", "6", "--min_side", "256", "--max_side", "384"]
runpy.run_module("visor_jax.data.synthetic", run_name="__main__")
from visor_jax.data import synthetic
r = synthetic.records("train", data_dir, seed=0,
                      sizes={"train": 20, "validation": 6, "test": 6}, min_side=256, max_side=384)
assert len(r) == 20 and r[3]["id"] == "train-000003"
assert "tensorflow" not in sys.modules, "tensorflow was imported"
print("SUBPROCESS_OK")
"""


def _files(data_dir):
  return {p.relative_to(data_dir): p.read_bytes()
          for p in sorted(pathlib.Path(data_dir).rglob("*.array_record*"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Three builds: a and b (same seed; b in a subprocess) and c (another seed)."""
  dirs = {k: tmp_path_factory.mktemp(f"synthetic_{k}") for k in "abc"}
  synthetic.build(dirs["a"], **PARAMS)
  synthetic.build(dirs["c"], **{**PARAMS, "seed": 1})
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(dirs["b"])], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "SUBPROCESS_OK" in proc.stdout, proc.stdout + proc.stderr
  return dirs, proc.stdout


def _all(data_dir, **overrides):
  return {s: list(synthetic.records(s, data_dir, **{**PARAMS, **overrides}))
          for s in synthetic.SPLITS}


def test_cli_prints_sizes_and_samples(built):
  _, out = built
  assert "train: 20 examples" in out and "validation: 6 examples" in out
  assert "test: 6 examples" in out and "->" in out


def test_same_seed_byte_identical_files_and_records(built):
  dirs, _ = built
  a, b = _files(dirs["a"]), _files(dirs["b"])
  assert len(a) == 3 and a.keys() == b.keys()
  for name in a:
    assert a[name] == b[name], f"{name} differs between two builds with the same seed"
  assert _all(dirs["a"]) == _all(dirs["b"])


def test_different_seed_differs(built):
  dirs, _ = built
  a, c = _all(dirs["a"]), _all(dirs["c"], seed=1)
  assert [r["image"] for r in a["train"]] != [r["image"] for r in c["train"]]
  assert list(_files(dirs["a"]).values()) != list(_files(dirs["c"]).values())


def test_config_encodes_parameters(built):
  dirs, _ = built
  names = {p.name for p in (pathlib.Path(dirs["a"]) / "visor_synthetic_vqa").iterdir()}
  assert names == {synthetic.make_config(**PARAMS).name}
  assert synthetic.make_config(**PARAMS).name != synthetic.make_config(**{**PARAMS, "seed": 1}).name
  with pytest.raises(FileNotFoundError):
    synthetic.records("train", dirs["a"], **{**PARAMS, "max_side": 385})


def test_build_is_idempotent(built):
  dirs, _ = built
  before = {p: p.stat().st_mtime_ns for p in pathlib.Path(dirs["a"]).rglob("*") if p.is_file()}
  assert synthetic.build(dirs["a"], **PARAMS) == os.fspath(dirs["a"])
  after = {p: p.stat().st_mtime_ns for p in pathlib.Path(dirs["a"]).rglob("*") if p.is_file()}
  assert before == after


def test_record_contract(built):
  dirs, _ = built
  for split, recs in _all(dirs["a"]).items():
    assert len(recs) == PARAMS["sizes"][split]
    assert {r["family"] for r in recs} == {"easy", "hard"}, split
    for i, r in enumerate(recs):
      assert set(r) == KEYS and r["id"] == f"{split}-{i:06d}"
      assert isinstance(r["image"], bytes) and r["image"][:8] == b"\x89PNG\r\n\x1a\n"
      human, gpt = r["conversations"]
      assert human["from"] == "human" and human["value"].startswith("<image>\n")
      assert gpt == {"from": "gpt", "value": r["answer"]}
      assert r["kind"] in synthetic.FAMILY_KINDS[r["family"]]
      assert all(isinstance(r[k], str) for k in ("id", "family", "kind", "answer"))
  recs = synthetic.records("train", dirs["a"], **PARAMS)
  assert recs[-1] == recs[19] and recs[1:3] == [recs[1], recs[2]]
  with pytest.raises(IndexError):
    recs[20]


def _check_answer(rec, scene):
  """Re-derives the answer independently from the decoded pixels / the scene geometry."""
  kind, ans, shapes = rec["kind"], rec["answer"], scene["shapes"]
  question = rec["conversations"][0]["value"]
  if kind == "dominant_colour":
    pixels = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB")).reshape(-1, 3)
    counts = {name: int(np.all(pixels == rgb, axis=1).sum())
              for name, rgb in synthetic.COLOURS.items()}
    first, second = sorted(counts.values())[::-1][:2]
    assert counts[ans] == first and first - second >= 0.01 * len(pixels)
  elif kind == "has_shape":
    shape = question.split("Is there a ")[1].rstrip("?")
    assert ans == ("yes" if any(s["kind"] == shape for s in shapes) else "no")
  elif kind == "count_large":
    assert ans == str(sum(s["r"] >= 0.1 * min(scene["width"], scene["height"]) for s in shapes))
  elif kind == "code":
    assert ans == scene["code"] and len(ans) == 4 and ans.isdigit()
  else:
    small, other = question.split("small ")[1].rstrip("?").split(" next to the ")
    anchors = [s for s in shapes if s["kind"] == other]
    assert len(anchors) == 1  # "the triangle" is definite
    near = [s for s in shapes if s["kind"] == small and s["size"] == "small"
            and synthetic._gap(synthetic._box(s["cx"], s["cy"], s["r"]),
                               synthetic._box(anchors[0]["cx"], anchors[0]["cy"], anchors[0]["r"]))
            < synthetic.FAR * min(scene["width"], scene["height"])]
    assert len(near) == 1 and ans == near[0]["colour"]


def test_answers_match_regenerated_scenes(built):
  dirs, _ = built
  for split, recs in _all(dirs["a"]).items():
    for i, rec in enumerate(recs):
      expected, scene = synthetic.generate_example(0, split, i, 256, 384)
      assert rec == expected  # the stored record is exactly the pure generator's output
      image = Image.open(io.BytesIO(rec["image"]))
      assert image.size == (scene["width"], scene["height"])
      assert all(256 <= v <= 384 for v in image.size)
      _check_answer(rec, scene)


def test_make_example_is_pure_and_uses_default_size_range():
  a, scene = synthetic.make_example(np.random.default_rng(7))
  b, _ = synthetic.make_example(np.random.default_rng(7))
  assert a == b
  assert all(768 <= v <= 1536 for v in Image.open(io.BytesIO(a["image"])).size)
  _check_answer(a, scene)


def test_corpus_covers_generated_text(built):
  dirs, _ = built
  corpus = set(synthetic.corpus())
  for recs in _all(dirs["a"]).values():
    for r in recs:
      assert r["conversations"][0]["value"].removeprefix("<image>\n") in corpus
      assert r["answer"] in corpus or (r["kind"] == "code" and set(r["answer"]) <= corpus)
