"""Router: the pseudo-label rule, learning budgets from real routing features, end to end."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from visor_jax import config_lib, model_configs
from visor_jax.training import router_train
from visor_jax.data import pipeline, synthetic
from visor_jax.data.tokenizer import build_tiny_tokenizer
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax.models.router import Router, choose

FEASIBLE = [[], [4], [1, 4]]


def test_pseudo_labels_pick_the_cheapest_budget_reaching_99_percent_of_full():
  # columns: CA-only, SA{4}, SA{1,4} (cheapest first); full = maximal configuration's score
  scores = np.array([[0.90, 0.95, 0.99],    # 0.90 < 0.99*1.0; 0.95 < 0.99; 0.99 >= 0.99 → 2
                     [0.50, 0.60, 0.70],    # CA-only already >= 0.99 * 0.5 → 0
                     [0.10, 0.80, 0.20],    # SA{4} reaches 0.99 * 0.8 → 1
                     [0.10, 0.20, 0.30],    # none reaches 0.99 * 0.9 → the most expensive, 2
                     [1.00, 1.00, 1.00]])   # correctness scores, full right: CA-only → 0
  full = np.array([1.0, 0.5, 0.8, 0.9, 1.0])
  np.testing.assert_array_equal(router_train.pseudo_labels(scores, full, 0.99), [2, 0, 1, 2, 0])
  # With correctness scores and a wrong full budget, the cheapest budget is enough.
  np.testing.assert_array_equal(router_train.pseudo_labels(np.zeros((1, 3)), np.zeros(1)), [0])


def test_threshold_is_a_monotone_cost_knob():
  logits = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  picks = [np.asarray(choose(logits, th)) for th in np.linspace(0.05, 1.0, 12)]
  means = [p.mean() for p in picks]
  assert means == sorted(means) and means[0] < means[-1]
  assert (picks[-1] == 2).all()


@pytest.fixture(scope="module")
def features(tmp_path_factory):
  """Routing features of real synthetic questions (tiny model) with their question family."""
  d = str(tmp_path_factory.mktemp("synthetic_router"))
  sizes = dict(train=96, validation=4, test=4)
  synthetic.build(d, seed=1, sizes=sizes, min_side=256, max_side=320)
  m = model_configs.tiny()
  cfg = config_lib.model_config(m)
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  label_fn = jax.jit(router_train.make_label_fn(graphdef, "likelihood"))
  tok = build_tiny_tokenizer(synthetic.corpus(), vocab_size=300)
  it = pipeline.make_iterator(
      synthetic.records("train", d, seed=1, sizes=sizes, min_side=256, max_side=320), tok, cfg,
      dict(batch_size=16, text_buckets=(128,), num_epochs=1, shuffle=False, num_workers=0))
  rows = np.zeros((1, cfg.num_layers), bool)
  feats, fams = [], []
  for batch in it:
    keep = batch["sample_valid"]
    f, _ = label_fn(nnx.to_pure_dict(params), {k: v for k, v in batch.items()
                                            if k not in pipeline.HOST_FIELDS}, rows)
    feats.append(np.asarray(f)[keep])
    fams.append(batch["group"][keep])
  return cfg, np.concatenate(feats), np.concatenate(fams)


def test_router_gives_hard_questions_more_sa_layers(features):
  """Labels that say "hard questions need the maximal budget, easy ones none" are learnable
  from the routing token: held-out hard questions get more SA layers than easy ones."""
  cfg, feats, fams = features
  m = model_configs.tiny()
  m.router.feasible = FEASIBLE
  rcfg = config_lib.model_config(m)
  labels = np.where(fams == "hard", 2, 0)
  n = len(labels) * 3 // 4
  router = Router(rcfg, rngs=nnx.Rngs(0))
  acc = router_train.train_router(router, feats[:n], labels[:n], epochs=150, lr=3e-3,
                                  batch_size=32, seed=0)
  assert acc > 0.9
  n_sa = np.array([len(s) for s in FEASIBLE])
  chosen = n_sa[np.asarray(choose(router(feats[n:]), 0.5))]
  held_fams = fams[n:]
  assert chosen[held_fams == "hard"].mean() > chosen[held_fams == "easy"].mean() + 1.0


@pytest.mark.slow
def test_router_training_end_to_end(tiny_run, tmp_path):
  """Universal run → pseudo-labels → router → a run directory that routes."""
  import ml_collections
  from visor_jax import checkpoints, runs
  from visor_jax.training import config as train_config
  c = train_config.default("tiny")
  c.router_train = ml_collections.ConfigDict(dict(
      from_workdir=tiny_run, feasible="", split="train", num_samples=24, score="likelihood",
      ratio=0.99, hidden=32, threshold=0.5, epochs=20, lr=1e-3, batch_size=8))
  stats = router_train.main(c, str(tmp_path / "router"))
  assert stats["samples"] == 24 and sum(stats["label_histogram"]) == 24
  majority = max(stats["label_histogram"]) / 24
  assert stats["router_train_accuracy"] >= majority - 1e-9
  assert {"mean_sa_label_easy", "mean_sa_label_hard"} <= set(stats)  # per question group
  saved = checkpoints.read_run(str(tmp_path / "router"))
  assert [list(b) for b in saved["model"].router.feasible] == FEASIBLE
  routed = runs.load_run(str(tmp_path / "router"))
  assert routed.cfg.router.enabled and routed.tokenizer.files == runs.describe_run(
      tiny_run).tokenizer.files
  assert saved["image_processor"] is not None  # the universal run's, carried on
  assert routed.image_spec == runs.describe_run(tiny_run).image_spec
  # Router training writes metrics like a training run: a curve per epoch, then the summary.
  logged = [json.loads(line) for line in open(tmp_path / "router" / "metrics.jsonl")]
  curve = [r for r in logged if "router/loss" in r]
  assert [r["step"] for r in curve] == list(range(1, 21))
  assert all(np.isfinite(r["router/loss"]) and 0 <= r["router/accuracy"] <= 1 for r in curve)
  assert curve[-1]["router/accuracy"] == pytest.approx(stats["router_train_accuracy"])
  assert [r["router/samples"] for r in logged if "router/samples" in r] == [24]
  assert os.listdir(tmp_path / "router" / "tensorboard")
  with pytest.raises(ValueError, match=r"router_train.feasible.*not SA candidates"):
    c.router_train.feasible = "[2]"
    router_train.main(c, str(tmp_path / "bad"))
