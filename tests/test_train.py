"""The trainer end to end: resume exactness, preemption, sharding, budgets, freezing, NaN."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

import train_fixtures as tf
from visor_jax import checkpoints, config_lib, model_configs, runs
from visor_jax.evaluation import main as eval_main
from visor_jax.training import config as train_config
from visor_jax.training import optim, steps, train
from visor_jax.models.llava_onevision import LlavaOnevision


def _final_params(workdir, step):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                              item_names=checkpoints.ITEMS,
                              options=ocp.CheckpointManagerOptions(read_only=True))
  state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return traverse_util.flatten_dict(state["params"], sep=".")


def _eval_summary(workdir):
  with open(os.path.join(workdir, "eval", "summary.json")) as f:
    return json.load(f)


def test_trainer_table_is_the_evaluation_harness(tiny_run, tmp_path):
  """One meaning of accuracy: `evaluation.main` on the saved run and the same validation
  items gives the trainer's end-of-run numbers, sample by sample."""
  trained = {r["label"]: r for r in _eval_summary(tiny_run)["runs"]}
  assert set(trained) == {"CA-only", "SA{4}", "SA{1,4}"}
  summary = eval_main.run(tiny_run, str(tmp_path), synthetic_split="validation", limit=4,
                          batch_size=4, max_new_tokens=4, print_fn=lambda *_: None)
  for r in summary["runs"]:
    assert r["n_scored"] == trained[r["label"]]["n_scored"] == 4
    assert r["overall"] == trained[r["label"]]["overall"]
    assert r["per_group"] == trained[r["label"]]["per_group"]


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_run(tmp_path, synthetic_dir):
  extra = ("--config.num_steps=8", "--config.ckpt_every=4", "--config.log_every=1",
           f"--config.data.synthetic_dir={synthetic_dir}", *tf.NO_EVAL_FLAGS)
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  out = tf.run_main(full, *extra)
  assert out.returncode == 0, out.stderr[-3000:]

  proc = subprocess.Popen(tf.main_command(killed, "configs/universal.py:model=tiny,batch=4",
                                          *extra),
                          cwd=tf.ROOT, env=tf.env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, "checkpoints", "4")):
    assert proc.poll() is None and time.time() < deadline, "no checkpoint at step 4"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = tf.run_main(killed, *extra)  # resumes from its own step-4 checkpoint
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from own checkpoint at step 4" in out.stderr

  losses_full, losses_resumed = tf.step_losses(full), tf.step_losses(killed)
  assert sorted(losses_full) == list(range(1, 9))
  assert losses_resumed == losses_full  # exactly: same data order, same budgets, same math
  a, b = _final_params(full, 8), _final_params(killed, 8)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, synthetic_dir):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
      tf.main_command(workdir, "configs/universal.py:model=tiny,batch=4",
                      "--config.num_steps=500", "--config.ckpt_every=1000",
                      f"--config.data.synthetic_dir={synthetic_dir}", *tf.NO_EVAL_FLAGS),
      cwd=tf.ROOT, env=tf.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics_file) and len(tf.step_losses(workdir)) >= 3):
    assert proc.poll() is None and time.time() < deadline, "training did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "preempted: checkpoint of step" in err
  steps_saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                       if d.isdigit())
  assert steps_saved[-1] >= 3 and steps_saved[-1] < 500


@pytest.mark.slow
def test_sharded_mesh_matches_one_device_and_budgets_never_recompile(tmp_path, synthetic_dir):
  """Same steps on a (2, 2, 2) data/fsdp/tensor mesh of 8 CPU devices and on one device."""
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  runs = {}
  for name, mesh in (("one", dict(data=1, fsdp=1, tensor=1, num_devices=1)),
                     ("mesh", dict(data=2, fsdp=2, tensor=2, num_devices=0))):
    c = tf.tiny_config(synthetic_dir, mesh=mesh, num_steps=5, ckpt_every=100, **tf.NO_EVAL)
    result = train.main(c, str(tmp_path / name))
    runs[name] = (result, tf.step_losses(str(tmp_path / name)), tf.read_metrics(
        str(tmp_path / name)))
  (_, l_one, _), (sharded, l_mesh, m_mesh) = runs["one"], runs["mesh"]
  # f32, different reduction orders across shards: equal to a few ulps of the loss scale.
  np.testing.assert_allclose([l_mesh[s] for s in sorted(l_mesh)],
                             [l_one[s] for s in sorted(l_one)], rtol=0, atol=2e-5)
  kernel = sharded.state["params"]["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (6, 32, 64)  # [L, D/2, F/2]
  budgets_used = {r["budget"] for r in m_mesh if "budget" in r}
  assert len(budgets_used) >= 2
  assert all(r["compilations"] == 1 for r in m_mesh if "compilations" in r)


def _tiny_batch(cfg, b=2, t=16, n=8, p=2, seed=0):
  rng = np.random.default_rng(seed)
  s = cfg.vision.image_size
  return dict(
      tokens=rng.integers(0, 256, (b, t)).astype(np.int32),
      text_pos=np.tile(np.r_[0:4, 4 + n:t + n], (b, 1)).astype(np.int32),
      text_valid=np.ones((b, t), bool), pixels=rng.normal(size=(b, p, s, s, 3)).astype(np.float32),
      vis_src=rng.integers(0, p * cfg.vision.num_patches, (b, n, 4)).astype(np.int32),
      vis_weight=np.full((b, n, 4), 0.25, np.float32), vis_newline=np.zeros((b, n), bool),
      vis_pos=np.tile(np.arange(4, 4 + n), (b, 1)).astype(np.int32),
      vis_valid=np.ones((b, n), bool),
      targets=np.where(np.arange(t) >= t // 2, rng.integers(0, 256, (b, t)), -1).astype(np.int32))


@pytest.fixture(scope="module")
def tiny_model(cfg):
  """(graphdef, params) of the tiny model: a jitted init (an eager one costs seconds)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0))))
  return graphdef, jax.device_get(runs.random_params(cfg, 0, None))


def _step_setup(tiny_model, groups):
  cfg = config_lib.model_config(model_configs.tiny())
  graphdef, params = tiny_model
  o = train_config.default("tiny").optim
  o.param_groups = groups
  labels = optim.param_labels(params, groups)
  tx = optim.make_optimizer(o, labels, total_steps=10)
  step = jax.jit(steps.make_train_step(graphdef, tx, labels))
  return cfg, params, labels, tx, step


def test_frozen_parameters_are_bit_identical_after_training(tiny_model):
  cfg, params, labels, tx, step = _step_setup(tiny_model, train_config.GROUPS_STAGE1)
  state = steps.init_state(params, tx, labels)
  budget = np.zeros((2, cfg.num_layers), bool)  # CA-only: the new parts carry all vision
  # Zero-initialised outputs unlock the parts behind them one step at a time (lr 0 at step 0,
  # then CA output, then CA inputs and the pointwise conv, then the depthwise conv).
  for i in range(5):
    state, m = step(state, _tiny_batch(cfg, seed=i), budget)
    assert int(m["finite"]) == 1
  before = traverse_util.flatten_dict(params, sep=".")
  after = traverse_util.flatten_dict(jax.device_get(state["params"]), sep=".")
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  frozen = {k for k, g in labels.items() if g == optim.FROZEN}
  assert frozen and not (changed & frozen)
  assert changed == set(labels) - frozen  # every new-part parameter moved


def test_nonfinite_loss_leaves_state_unchanged(tiny_model):
  cfg, params, labels, tx, step = _step_setup(tiny_model, train_config.GROUPS_ALL)
  state = steps.init_state(params, tx, labels)
  batch = _tiny_batch(cfg)
  batch["pixels"][0, 0, 0, 0, 0] = np.inf
  new, m = step(state, batch, np.ones((2, cfg.num_layers), bool))
  assert int(m["finite"]) == 0 and int(new["step"]) == 1
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(new["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_equals_the_full_batch(tiny_model):
  cfg, params, labels, tx, _ = _step_setup(tiny_model, train_config.GROUPS_ALL)
  graphdef = tiny_model[0]
  batch = _tiny_batch(cfg, b=4)
  budget = np.zeros((4, cfg.num_layers), bool)
  budget[:, 1] = True
  outs = []
  for k in (1, 2):
    step = jax.jit(steps.make_train_step(graphdef, tx, labels, grad_accum=k))
    outs.append(step(steps.init_state(params, tx, labels), batch, budget))
  (s1, m1), (s2, m2) = outs
  # Each micro-batch has the same number of supervised tokens, so mean-of-means = mean.
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow
def test_nan_stops_the_run_naming_the_step_and_no_nan_checkpoint(tmp_path, synthetic_dir):
  c = tf.tiny_config(synthetic_dir, num_steps=30, ckpt_every=1, **tf.NO_EVAL)
  c.optim.update(lr=1e12, warmup_steps=0, clip_norm=1e30)
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    train.main(c, str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  latest = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  for v in _final_params(str(tmp_path), latest).values():
    assert np.all(np.isfinite(v))


@pytest.mark.slow
def test_restore_onto_a_different_mesh_continues_the_run(tmp_path, synthetic_dir, tiny_run):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run, workdir)  # one device, 4 steps, a checkpoint at step 4
  c = tf.tiny_config(synthetic_dir, num_steps=5, ckpt_every=100,
                     mesh=dict(data=1, fsdp=2, tensor=4, num_devices=0), **tf.NO_EVAL)
  second = train.main(c, workdir)  # resumes step 4 from a one-device checkpoint on 8 devices
  assert int(second.state["step"]) == 5
  kernel = second.state["params"]["decoder"]["layers"]["attn"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert sorted(tf.step_losses(workdir)) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_init_from_transformers_dir_and_from_another_run(tmp_path, synthetic_dir):
  """Restore order below the run's own checkpoint: init_from an HF directory (stage 1: the
  LLaVA-OV weights stay bit-identical, CA starts as copies), then init_from that run, on a
  machine where the HF directory no longer exists (the checkpoint describes itself, its
  image processor included: CLIP's mean/std here, kept through training and export)."""
  import hf_fixtures
  from visor_jax import export
  from visor_jax.data import preprocess
  model = hf_fixtures.build_hf_model(model_configs.tiny())
  model.config.text_config.rms_norm_eps = 1e-5  # a setting only config.json knows
  hf_dir = hf_fixtures.save_hf_dir(model, tmp_path / "hf", hf_fixtures.tiny_tokenizer(),
                                   image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))
  from visor_jax.convert import hf_import
  reference, cfg = hf_import.load_hf_model(hf_dir)
  assert cfg.text.rms_norm_eps == 1e-5
  c = tf.tiny_config(synthetic_dir, num_steps=2, init_from=hf_dir, **tf.NO_EVAL)
  c.optim.param_groups = train_config.GROUPS_STAGE1
  stage1 = train.main(c, str(tmp_path / "stage1"))
  ref = hf_import.flat_params(reference)
  got = traverse_util.flatten_dict(jax.device_get(stage1.state["params"]), sep=".")
  for k, v in ref.items():
    if not k.startswith(("decoder.cross.", "decoder.pos_conv.")):
      np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=k)
  np.testing.assert_array_equal(got["decoder.cross.attn.k_proj.kernel"][1],
                                got["decoder.layers.attn.k_proj.kernel"][3])  # CA on layer 3
  hf_files = runs.describe_run(hf_dir).tokenizer.files
  hf_spec = runs.describe_run(hf_dir).image_spec
  assert hf_spec.image_mean == (0.48, 0.46, 0.41)
  shutil.rmtree(hf_dir)
  loaded = runs.load_run(str(tmp_path / "stage1"))
  assert loaded.cfg.text.rms_norm_eps == 1e-5 and loaded.tokenizer.files == hf_files
  assert loaded.image_spec == hf_spec
  export.export(str(tmp_path / "stage1"), str(tmp_path / "export"))
  assert preprocess.ImageProcessorSpec.from_hf_dir(str(tmp_path / "export")) == hf_spec
  c2 = tf.tiny_config(synthetic_dir, num_steps=0, init_from=str(tmp_path / "stage1"),
                      **tf.NO_EVAL)
  assert runs.experiment_image_spec(c2, loaded.cfg) == hf_spec  # stage 2 sees the same pixels
  stage2 = train.main(c2, str(tmp_path / "stage2"))
  again = traverse_util.flatten_dict(jax.device_get(stage2.state["params"]), sep=".")
  for k in got:
    np.testing.assert_array_equal(again[k], got[k], err_msg=k)


@pytest.mark.slow
def test_default_command_trains_and_prints_the_eval_table(tmp_path):
  """README's main command (VISOR on the pages dataset through its curriculum), with the
  curriculum and the data shrunk. Its table is the evaluation harness's, per pages family."""
  cmd = [sys.executable, "-m", "visor_jax.main", "--config=configs/universal.py",
         f"--workdir={tmp_path}", "--config.num_steps=60", "--config.log_every=10",
         "--config.data.pages_curriculum=readout:40,fine/2:10,all/2@interaction:5,all:5",
         "--config.data.synthetic_sizes.train=16", "--config.data.synthetic_sizes.validation=16",
         "--config.data.synthetic_sizes.test=16", "--config.eval_batches=1",
         "--config.eval_items=8"]
  out = subprocess.run(cmd, cwd=tf.ROOT, env=tf.env(fast_compile=False), capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "accuracy of generated answers" in out.stdout
  # tfds announces the full pages' build; the curriculum phases' builds are quiet.
  assert out.stdout.count("Downloading and preparing") == 1, out.stdout
  for phase in ("readout: 40 steps, 640 records", "all/2@interaction: 5 steps, 80 records"):
    assert f"curriculum phase {phase}" in out.stderr, out.stderr[-3000:]
  for label in ("CA-only", "SA{4}", "SA{1,4}"):
    assert label in out.stdout
  logged = {k: v for r in tf.read_metrics(str(tmp_path)) for k, v in r.items()}
  assert {"eval/CA-only/tf_exact", "eval/SA_1_4/loss", "eval/SA_4/acc", "hop_loss",
          "eval/SA_4/acc_interaction", "eval/CA-only/tf_exact/interaction"} <= set(logged)
  # Per-family accuracy with its 95% interval, and each column's n.
  assert re.search(r"SA\{4\} +\d\.\d\d \[\d\.\d\d,\d\.\d\d\]", out.stdout), out.stdout
  assert re.search(r"^n: all 8, coarse \d+, control \d+, fine \d+, interaction \d+$",
                   out.stdout, re.M), out.stdout
  assert _eval_summary(str(tmp_path))["runs"][0]["n_scored"] == 8
  losses = tf.step_losses(str(tmp_path))   # the readout phase (steps 1-40) is learned
  first = np.mean([losses[s] for s in range(1, 11)])
  last = np.mean([losses[s] for s in range(31, 41)])
  assert last < 0.7 * first, (first, last)
