"""Multi-host on one machine: two processes on 127.0.0.1 (gloo CPU collectives) train as one
process does, share one Orbax checkpoint, and resume each other's checkpoints; the data
position survives a change of process count (data/elastic.py)."""
import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest
from flax import traverse_util

import train_fixtures as tf
from test_pipeline import make_record, png
from visor_jax import distributed, runs
from visor_jax.data import elastic, pipeline


# ----------------------------------------------------------------------------- data position

@pytest.fixture(scope="module")
def records():
  return [make_record(3 * i, png(20 + i, 30, i)) for i in range(10)]  # one text bucket


def _stream(records, tok, cfg, index, count, batch):
  return pipeline.make_iterator(records, tok, cfg, batch_size=batch, text_buckets=(96,),
                                num_epochs=None, shard_index=index, shard_count=count)


def _global_batches(iters, n):
  """n global batches of these hosts' iterators: each step's record indices, sorted (the
  loss is a mean over the batch, so a batch is its set of records)."""
  return [sorted(np.concatenate([next(it)["record_index"] for it in iters]).tolist())
          for _ in range(n)]


def _save(iters, directory, step):
  data = directory / str(step) / "data"
  data.mkdir(parents=True)
  for i, it in enumerate(iters):
    (data / f"process_{i}-of-{len(iters)}.json").write_text(json.dumps(it.get_state()))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_resuming_with_another_process_count_reads_the_uninterrupted_stream(
    records, tok, cfg, tmp_path, before, after):
  global_batch = 4
  reference = _global_batches([_stream(records, tok, cfg, 0, 1, global_batch)], 7)
  old = [_stream(records, tok, cfg, i, before, global_batch // before) for i in range(before)]
  assert _global_batches(old, 3) == reference[:3]
  _save(old, tmp_path, 3)
  saved = elastic.saved_states(tmp_path, 3)
  new = [_stream(records, tok, cfg, j, after, global_batch // after) for j in range(after)]
  for j, it in enumerate(new):
    it.set_state(elastic.remap(saved, j, after))
  assert _global_batches(new, 4) == reference[3:]  # crosses the epoch boundary (10 records)


def test_hosts_at_different_positions_resume_from_the_slowest(records, tok, cfg, tmp_path,
                                                               caplog):
  # The stream's global records, one at a time: host i of 2 reads global records i, i+2, ...
  order = [int(next(it)["record_index"][0]) for it in [_stream(records, tok, cfg, 0, 1, 1)]
           for _ in range(10)]
  old = [_stream(records, tok, cfg, i, 2, 2) for i in range(2)]
  take = lambda it: next(it)["record_index"].tolist()
  assert take(old[0]) + take(old[0]) == [order[g] for g in (0, 2, 4, 6)]  # host 0: 2 batches
  assert take(old[1]) == [order[g] for g in (1, 3)]                        # host 1: 1 batch
  _save(old, tmp_path, 1)
  one = _stream(records, tok, cfg, 0, 1, 2)
  with caplog.at_level("WARNING"):
    one.set_state(elastic.remap(elastic.saved_states(tmp_path, 1), 0, 1))
  # From host 1's next record (global 5) on: nothing skipped; global 6 (host 0's) read again.
  assert take(one) + take(one) == order[5:9]
  assert "1 record(s) that faster hosts had read past the slowest one's" in caplog.text


def test_saved_states_refuse_an_incomplete_or_worker_checkpoint(tmp_path):
  data = tmp_path / "5" / "data"
  data.mkdir(parents=True)
  (data / "process_1-of-2.json").write_text("{}")
  with pytest.raises(ValueError, match=r"found \[1\] of counts \[2\]"):
    elastic.saved_states(tmp_path, 5)
  worker_state = {"parent": {"workers_state": {}, "iterations_to_skip": {}}}
  with pytest.raises(ValueError, match="num_workers > 0"):
    elastic.remap({0: worker_state}, 0, 2)


def test_join_settings_explicit_environment_or_auto(monkeypatch):
  import ml_collections
  for name in distributed.ENV:
    monkeypatch.delenv(name, raising=False)
  c = ml_collections.ConfigDict(dict(distributed=False, coordinator_address="",
                                     num_processes=0, process_id=-1))
  assert distributed.join_settings(c) is None
  c.distributed = True
  assert distributed.join_settings(c) == {}
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed.join_settings(c) == dict(coordinator_address="127.0.0.1:1234",
                                              num_processes=2, process_id=1)
  c.process_id = 0  # a config field wins over the environment
  assert distributed.join_settings(c)["process_id"] == 0
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  with pytest.raises(ValueError, match="go together"):
    distributed.join_settings(c)


# ----------------------------------------------------------------------------- two processes

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(workdir, processes, steps, synthetic_dir, *extra):
  """visor_jax.main with `processes` processes of 2 // processes CPU devices each, global batch
  4 (2 devices either way); returns each process's stderr."""
  port = _free_port()
  procs = []
  for i in range(processes):
    env = tf.env()
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={2 // processes}"
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i), JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    cmd = tf.main_command(
        workdir, f"configs/universal.py:model=tiny,batch={4 // processes},steps={steps}",
        f"--config.data.synthetic_dir={synthetic_dir}", "--config.ckpt_every=2",
        "--config.log_every=1", "--config.async_ckpt=False", *extra)
    procs.append(subprocess.Popen(cmd, cwd=tf.ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return [err for _, err in outs]


def _params(workdir, step):
  """The run's parameters at `step`, on this process's first device (whatever mesh and
  processes wrote them)."""
  params = runs.load_run(workdir, step).params
  return traverse_util.flatten_dict(jax.device_get(params), sep=".")


def _assert_same_training(a, b, steps):
  """Same losses and parameters. Tolerance: the two runs sum the same per-device gradients
  in a different order (gloo across processes vs XLA within one), so float32 rounding
  differs; 1e-5 relative on the loss and 2e-5 absolute on parameters of scale ~0.02-1."""
  la, lb = tf.step_losses(a), tf.step_losses(b)
  assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
  np.testing.assert_allclose([la[s] for s in sorted(la)], [lb[s] for s in sorted(lb)],
                             rtol=1e-5)
  pa, pb = _params(a, steps), _params(b, steps)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], atol=2e-5, rtol=0, err_msg=k)


@pytest.mark.slow
def test_two_processes_train_evaluate_and_resume_like_one(tmp_path, synthetic_dir):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # Weights and optimizer state FSDP-sharded over the 2 devices: with 2 processes every
  # array spans both hosts (the checkpoint too, and the evaluation reads such weights).
  fsdp = ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.eval_items=4",
          "--config.eval_budgets=[4]")
  _train(one, 1, 2, synthetic_dir, *fsdp)
  errs = _train(two, 2, 2, synthetic_dir, *fsdp)
  assert "(2 processes)" in errs[0] and "process 1 of 2 joined" in errs[1]
  _assert_same_training(one, two, 2)

  # Written once, by process 0: one metrics row per step, one TensorBoard file, one eval.
  rows = tf.read_metrics(two)
  assert [r["step"] for r in rows if "budget" in r] == [1, 2]
  assert len(os.listdir(os.path.join(two, "tensorboard"))) == 1
  # Every sample counted once: the 2-process eval scores the same 4 items with the same
  # answers, and the teacher-forced eval the same 4 validation rows (2 per host).
  summaries = [json.load(open(os.path.join(w, "eval", "summary.json"))) for w in (one, two)]
  for r1, r2 in zip(summaries[0]["runs"], summaries[1]["runs"]):
    assert r1["n_scored"] == r2["n_scored"] == 4
    assert r1["overall"] == r2["overall"]
  tf_n = [[r[k] for r in tf.read_metrics(w) for k in r if k.endswith("/n")] for w in (one, two)]
  assert tf_n[0] == tf_n[1] == [4]

  # The 2-process checkpoint resumes with 1 process, the 1-process one with 2, both onto a
  # data-parallel mesh; both continue as the same run would (data position remapped, see
  # data/elastic.py).
  errs_1 = _train(two, 1, 4, synthetic_dir, *tf.NO_EVAL_FLAGS)
  errs_2 = _train(one, 2, 4, synthetic_dir, *tf.NO_EVAL_FLAGS)
  assert "written by 2 process(es), resumed by 1" in errs_1[0]
  assert "written by 1 process(es), resumed by 2" in errs_2[0]
  _assert_same_training(one, two, 4)
