"""The trainer as an operator meets it: config paths checked first, SIGTERM at any time,
reruns that leave metrics.jsonl / TensorBoard with each step once, a quiet console."""
import json
import logging
import os
import shutil
import signal
import struct
import subprocess

import numpy as np
import PIL.Image
import pytest
from tensorboardX.proto import event_pb2

import hf_fixtures
import train_fixtures as tf
from visor_jax.data import sources
from visor_jax.training import config as train_config
from visor_jax.training import metrics, optim, train


# ---------------------------------------------------------------------------------------------
# Config paths: checked before anything builds or compiles.

@pytest.fixture
def nothing_may_start(monkeypatch):
  """The first thing the trainer does after its checks is build the mesh: here it fails."""
  def too_late(*a, **k):
    raise AssertionError("the trainer got past its path checks")
  monkeypatch.setattr(train.sharding, "make_mesh", too_late)


@pytest.mark.parametrize("field, value, error, message", [
    ("init_from", "/no/such/run", FileNotFoundError,
     r"config.init_from=/no/such/run: no such file or directory \(expected a transformers"),
    ("init_from", "EMPTY_DIR", FileNotFoundError, r"config.init_from=.*: not a run"),
    ("tokenizer", "/no/such/tok", FileNotFoundError, r"config.tokenizer=/no/such/tok: no such"),
    ("data.json_path", "", ValueError, r"config.data.json_path is not set"),
    ("data.json_path", "/no/such.jsonl", FileNotFoundError,
     r"config.data.json_path=/no/such.jsonl: no such file"),
    ("data.eval_json_path", "/no/val.jsonl", FileNotFoundError,
     r"config.data.eval_json_path=/no/val.jsonl: no such file"),
    ("data.image_root", "/no/images", FileNotFoundError,
     r"config.data.image_root=/no/images: no such directory"),
])
def test_missing_paths_fail_first_naming_the_field(tmp_path, nothing_may_start, field, value,
                                                   error, message):
  c = tf.tiny_config(str(tmp_path / "data"), **tf.NO_EVAL)
  if field.startswith("data."):
    (tmp_path / "train.jsonl").write_text("")
    c.data.update(source="json", json_path=str(tmp_path / "train.jsonl"))
  target, key = (c.data, field[5:]) if field.startswith("data.") else (c, field)
  target[key] = str(tmp_path) if value == "EMPTY_DIR" else value
  with pytest.raises(error, match=message):
    train.main(c, str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# A JSON run without validation files.

def _json_dataset(root, answer_words: int = 0, hostile: bool = False) -> str:
  """Eight LLaVA-format records over one image; answers longer by `answer_words` words.
  `hostile` adds records whose images are outside the root (`..`, absolute, a symlink out),
  missing or corrupt: each is a valid image file except the last two."""
  root.mkdir()
  PIL.Image.fromarray(hf_fixtures.random_image(48, 64, 0)).save(root / "a.png")
  images = ["a.png"] * 8
  if hostile:
    outside = root.parent / "outside.png"
    PIL.Image.fromarray(hf_fixtures.random_image(48, 64, 1)).save(outside)
    os.symlink(outside, root / "link.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    images += ["../outside.png", str(outside), "link.png", "missing.png", "corrupt.png"]
  with open(root / "train.jsonl", "w") as f:
    for i, image in enumerate(images):
      f.write(json.dumps({"id": f"r{i}", "image": image, "conversations": [
          {"from": "human", "value": "<image>\nWhat is the code?"},
          {"from": "gpt", "value": f"{1000 + i}" + " word" * answer_words}]}) + "\n")
  return str(root / "train.jsonl")


@pytest.mark.slow
def test_hostile_json_run_finishes_counting_every_bad_record(tmp_path, caplog, monkeypatch):
  """A JSON run over a hostile corpus, without validation files, trains to the end: every bad
  record counted under its own reason, no file outside the image root opened, over-long
  answers cut and counted, and the log says which evaluations it skips and why."""
  import builtins
  opened, real_open = [], builtins.open
  def spy(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)):
      opened.append(os.path.realpath(file))
    return real_open(file, *args, **kwargs)
  # Two steps of 4 need all 8 good records: the whole corpus is read at least once.
  c = tf.tiny_config("", num_steps=2, ckpt_every=1)  # eval_batches=1, eval_items=4 asked for
  c.data.update(source="json", max_bad_fraction=1.0, json_path=_json_dataset(
      tmp_path / "data", answer_words=5000, hostile=True))
  monkeypatch.setattr(builtins, "open", spy)  # from here on (the corpus is written)
  with caplog.at_level(logging.INFO):
    result = train.main(c, str(tmp_path / "run"))
  assert int(result.state["step"]) == 2 and result.eval == {} and result.teacher_forced == {}
  assert str(tmp_path / "outside.png") not in opened
  rows = tf.read_metrics(str(tmp_path / "run"))
  last = [r for r in rows if "data/truncated" in r][-1]
  assert last["data/truncated"] == 2 * c.data.batch_size  # every good sample, cut and counted
  assert last["bad/unsafe_path"] >= 3 and last["bad/missing_image"] >= 1
  assert last["bad/corrupt_image"] >= 1
  assert "no teacher-forced eval (eval/<budget>/tf_exact, loss): data.eval_json_path is not " \
         "set" in caplog.text
  assert "no end-of-run accuracy table: data.eval_questions is not set" in caplog.text
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")


# ---------------------------------------------------------------------------------------------
# SIGTERM before the loop.

@pytest.mark.slow
def test_sigterm_during_startup_exits_cleanly(tmp_path):
  """SIGTERM while the run builds its dataset (a fresh synthetic_dir) or compiles: exit 0 at
  once, nothing written, and the rerun starts from scratch."""
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
      tf.main_command(workdir, "configs/universal.py:model=tiny,batch=4",
                      "--config.num_steps=500", f"--config.data.synthetic_dir={tmp_path}/data",
                      *tf.NO_EVAL_FLAGS),
      cwd=tf.ROOT, env=tf.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:  # the mesh line: the handler is in place, the data build is next
    seen.append(line)
    if "mesh {" in line:
      break
  assert proc.poll() is None, "".join(seen)[-3000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  err = "".join(seen) + err
  assert proc.returncode == 0, err[-3000:]
  assert "preempted during startup (SIGTERM before the first step)" in err, err[-3000:]
  assert "compiled the train step" not in err
  ckpts = os.path.join(workdir, "checkpoints")
  assert not os.path.isdir(ckpts) or not [d for d in os.listdir(ckpts) if d.isdigit()]


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard across reruns.

def _tb_events(workdir):
  """(file index, event) of every event file in tensorboard/, in the order TensorBoard reads
  them (TFRecord framing: length, its CRC, the record, its CRC; CRCs not checked here)."""
  tb = os.path.join(workdir, "tensorboard")
  for i, name in enumerate(sorted(os.listdir(tb))):
    data = open(os.path.join(tb, name), "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      yield i, event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n


def _tb_scalars(workdir, loader: str) -> dict[str, list[tuple[int, float]]]:
  """What TensorBoard shows per tag. 'legacy' (the Python loader): a SessionLog START drops
  every earlier point at or after its step. 'rustboard' (the default): a point drops its own
  tag's earlier points at or after its step."""
  shown = {}
  for _, e in _tb_events(workdir):
    if loader == "legacy" and e.session_log.status == event_pb2.SessionLog.START:
      shown = {t: [p for p in pts if p[0] < e.step] for t, pts in shown.items()}
    for v in e.summary.value:
      pts = shown.setdefault(v.tag, [])
      if loader == "rustboard":
        pts[:] = [p for p in pts if p[0] < e.step]
      pts.append((e.step, v.simple_value))
  return shown


def _assert_each_step_once(workdir):
  rows = tf.read_metrics(workdir)
  seen = set()
  for r in rows:
    for k in r:
      if k != "step":
        assert (r["step"], k) not in seen, f"{k} twice at step {r['step']}"
        seen.add((r["step"], k))
  expected = {}
  for r in rows:
    for k, v in r.items():
      if k != "step":
        expected.setdefault(k, []).append((r["step"], float(v)))
  for loader in ("legacy", "rustboard"):
    shown = {t: pts for t, pts in _tb_scalars(workdir, loader).items() if pts}
    assert set(shown) == set(expected), loader
    for tag, pts in shown.items():
      got, want = sorted(pts), sorted(expected[tag])
      assert [s for s, _ in got] == [s for s, _ in want], (loader, tag, got, want)
      np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


def test_writer_reopened_at_a_step_writes_each_step_once(tmp_path):
  w = metrics.Writer(str(tmp_path))
  for s in range(1, 7):  # an attempt that checkpointed step 3, then died at step 6
    w.write(s, {"loss": 10.0 - s})
  w.write(3, {"eval/SA_4/loss": 9.0})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": ')  # cut short by the kill
  w = metrics.Writer(str(tmp_path), start_step=3)  # the resumed run redoes steps 4..6
  for s in range(4, 7):
    w.write(s, {"loss": 20.0 - s})
  w.write(6, {"eval/SA_4/loss": 1.0})
  w.close()
  rows = tf.read_metrics(str(tmp_path))
  assert [(r["step"], r.get("loss")) for r in rows if "loss" in r] == [
      (1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0), (6, 14.0)]
  _assert_each_step_once(str(tmp_path))
  # A finished run's rerun: step 6's evaluation again, replacing (not repeating) its rows.
  w = metrics.Writer(str(tmp_path), start_step=6, redo=("eval/",))
  w.write(6, {"eval/SA_4/loss": 0.5})
  w.close()
  rows = tf.read_metrics(str(tmp_path))
  assert [r["eval/SA_4/loss"] for r in rows if "eval/SA_4/loss" in r] == [9.0, 0.5]
  assert [r["loss"] for r in rows if r["step"] == 6 and "loss" in r] == [14.0]
  _assert_each_step_once(str(tmp_path))


@pytest.mark.slow
def test_resume_and_rerun_write_each_step_once(tmp_path, synthetic_dir, tiny_run, caplog):
  """A run that had logged past its checkpoint resumes from it; then the finished run is rerun.
  metrics.jsonl and TensorBoard hold each (step, scalar) once; step rows carry the learning
  rate; the console has progress lines, not a line per step."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run, workdir)  # 4 steps, checkpoint 4, its evaluation at step 4
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # an attempt past step 4
    f.write(json.dumps({"step": 5, "loss": 123.0, "budget": 0, "finite": 1}) + "\n")
  c = tf.tiny_config(synthetic_dir, num_steps=5, ckpt_every=100, log_every=5, eval_items=0)
  with caplog.at_level(logging.INFO):
    train.main(c, workdir)  # resumes at 4, trains step 5, teacher-forced eval at 5
  assert tf.step_losses(workdir)[5] != 123.0
  assert "step 5/5  loss" in caplog.text and "budget" not in caplog.text
  _assert_each_step_once(workdir)
  train.main(c, workdir)  # finished: only the evaluation again, replacing its rows
  _assert_each_step_once(workdir)
  rows = tf.read_metrics(workdir)
  assert sum("eval/SA_4/tf_exact" in r for r in rows if r["step"] == 5) == 1
  sched = optim.schedule(c.optim, 5)
  lrs = {r["step"]: r["lr"] for r in rows if "budget" in r}
  assert lrs[5] == pytest.approx(float(sched(4)))


def test_lr_scalars_follow_the_optimizer_schedules(cfg):
  """One 'lr' when every trained group shares a schedule, else one per group."""
  c = train_config.default("tiny")
  labels = {"a.kernel": "vision", "b.kernel": "llm", "c.kernel": "new", "d": optim.FROZEN}
  one = train._lr_schedules(c.optim, labels, 50)
  assert set(one) == {"lr"} and len(one["lr"]) == 50
  np.testing.assert_allclose(one["lr"][[0, 10, 49]], [float(optim.schedule(c.optim, 50)(s))
                                                      for s in (0, 10, 49)], rtol=1e-6)
  c.optim.lr_mult = {"vision": 0.1}
  per_group = train._lr_schedules(c.optim, labels, 50)
  assert set(per_group) == {"lr/llm", "lr/new", "lr/vision"}
  np.testing.assert_allclose(per_group["lr/vision"], 0.1 * per_group["lr/llm"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The console.

def test_dataset_build_prints_no_progress_bars_or_tfds_warnings(tmp_path, caplog, capfd):
  data = train_config.default("tiny").data
  data.update(synthetic_dir=str(tmp_path), synthetic_sizes=dict(train=2, validation=1, test=1),
              synthetic_min_side=64, synthetic_max_side=96)
  with caplog.at_level(logging.INFO):
    for split in ("train", "validation", "train"):  # one build, three builders
      sources.source_for(data, split, str(tmp_path))
  err = capfd.readouterr().err
  assert "Generating" not in err and "\x1b[A" not in err, err[-2000:]
  assert "Using custom data configuration" not in caplog.text + err
  assert "has no dataset_info.json" not in caplog.text + err
