"""Router training (method note, "The router"): pseudo-labels from the frozen universal model,
then the router MLP trained with cross-entropy. No RL, no Gumbel.

1. For each training sample, score every feasible budget and the full (maximal) one:
   'likelihood' = exp(mean log p(answer token)) (the per-token geometric-mean probability), or
   'correct' = teacher-forced answer exact match (1/0).
2. Its label is the cheapest feasible budget whose score reaches `ratio` (0.99) of the full
   budget's (`pseudo_labels`).
3. Features are the hidden state of the last prompt token entering the first SA candidate
   (exactly what the router reads at inference; causality keeps the answer out of it). The
   LVLM is frozen, so features are computed once and the MLP trains on them directly.
4. The result is a new run directory: the universal params plus the router, with
   `model.router.feasible` set, loadable by serving, evaluation and export like any run
   (`runs.load_run`). Metrics go to its metrics.jsonl / TensorBoard like a training run's:
   `router/loss` and `router/accuracy` per epoch (the step axis), then the summary.

    python -m visor_jax.main --config=configs/router.py --workdir=/tmp/visor_router \\
      --config.router_train.from_workdir=/tmp/visor_universal
"""
from __future__ import annotations

import json
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, traverse_util

from visor_jax import budgets as budgets_lib
from visor_jax import checkpoints, config_lib, paths, runs
from visor_jax.data import pipeline, sources
from visor_jax.models.llava_onevision import INPUT_KEYS, LlavaOnevision
from visor_jax.models.router import Router
from visor_jax.training import metrics
from visor_jax.training.steps import answer_exact

log = logging.getLogger(__name__)


def pseudo_labels(scores: np.ndarray, full: np.ndarray, ratio: float = 0.99) -> np.ndarray:
  """int[N]: per sample, the cheapest budget (column, cheapest first) with score >= ratio *
  the full budget's score; the most expensive one if none reaches it."""
  ok = scores >= ratio * full[:, None]
  return np.where(ok.any(axis=1), np.argmax(ok, axis=1), scores.shape[1] - 1)


def _score(logits, targets, kind: str):
  """float32[B]: one number per sample from its supervised tokens."""
  mask = targets >= 0
  if kind == "correct":
    return answer_exact(logits, targets).astype(jnp.float32)
  logp = -optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
  return jnp.exp(jnp.sum(logp * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1))


def make_label_fn(graphdef, kind: str):
  """(params, batch, rows bool[K, L]) → (features float32[B, D], scores float32[B, K])."""
  def fn(params, batch, rows):
    model = nnx.merge(graphdef, params)
    inputs = {k: batch[k] for k in INPUT_KEYS}
    b = batch["tokens"].shape[0]
    hidden, _ = model.prefix_hidden(inputs)
    first_target = jnp.argmax(batch["targets"] >= 0, axis=1)  # = the last prompt token
    features = hidden[jnp.arange(b), first_target].astype(jnp.float32)
    scores = jax.lax.map(
        lambda row: _score(model(inputs, jnp.broadcast_to(row, (b, row.shape[0]))),
                           batch["targets"], kind), rows)
    return features, scores.T
  return fn


def train_router(router: Router, features: np.ndarray, labels: np.ndarray, *, epochs: int,
                 lr: float, batch_size: int, seed: int,
                 on_epoch: Callable[[int, dict], None] = lambda epoch, scalars: None) -> float:
  """Cross-entropy on (features, labels); returns the final training accuracy. After each
  epoch, `on_epoch(epoch, {'loss': its mean batch loss, 'accuracy': training accuracy})`."""
  graphdef, params = nnx.split(router)
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  @jax.jit
  def accuracy(params, x, y):
    return (jnp.argmax(nnx.merge(graphdef, params)(x), -1) == y).mean()

  rng = np.random.default_rng(seed)
  n = len(labels)
  for epoch in range(1, epochs + 1):
    order, losses = rng.permutation(n), []
    for i in range(0, n, batch_size):
      idx = order[i:i + batch_size]
      params, opt, loss = step(params, opt, features[idx], labels[idx])
      losses.append(loss)
    on_epoch(epoch, {"loss": float(np.mean(jax.device_get(losses))),
                     "accuracy": float(accuracy(params, features, labels))})
  nnx.update(router, params)
  return float(accuracy(params, features, labels))


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Builds pseudo-labels, trains the router, writes a run with the router; returns stats."""
  r = config.router_train
  runs.check_source("router_train.from_workdir", r.from_workdir)  # before anything compiles
  paths.makedirs(workdir)

  # ---------------------------------------------------------------- the frozen universal run
  universal = runs.load_run(r.from_workdir)
  if universal.kind != "orbax":
    raise ValueError(f"router_train.from_workdir={r.from_workdir}: expected a training run "
                     f"(Orbax), got a {universal.kind} directory.")
  run, universal_cfg = universal.config, universal.cfg
  feasible = budgets_lib.resolve(r.feasible or run.budgets, universal_cfg,
                                 "router_train.feasible" if r.feasible else "budgets")
  model_dict = ml_collections.ConfigDict(universal.model.to_dict())
  model_dict.router = dict(feasible=feasible, hidden=r.hidden, threshold=r.threshold)
  cfg = config_lib.model_config(model_dict)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LlavaOnevision(universal_cfg,
                                                                rngs=nnx.Rngs(0))))
  params = universal.params

  # ---------------------------------------------------------------- pseudo-labels
  sets = [list(s) for s in cfg.router.feasible] + [budgets_lib.maximal(cfg)]
  rows = jnp.asarray(np.concatenate([budgets_lib.mask(cfg, s) for s in sets]))
  label_fn = jax.jit(make_label_fn(graphdef, r.score))
  source = sources.source_for(sources.question_format(run.data), r.split, universal.workdir)
  it = pipeline.make_iterator(source, universal.tokenizer, universal_cfg,
                              sources.pipeline_kwargs(run.data), num_epochs=1, shuffle=False,
                              num_workers=0, image_spec=universal.image_spec)
  feats, scores, groups = [], [], []
  for batch in it:
    keep = batch["sample_valid"] & (batch["targets"] >= 0).any(axis=1)
    f, s = jax.device_get(label_fn(params, {k: v for k, v in batch.items()
                                            if k not in pipeline.HOST_FIELDS}, rows))
    feats.append(f[keep]), scores.append(s[keep]), groups.append(batch["group"][keep])
    if sum(len(x) for x in feats) >= r.num_samples:
      break
  feats, scores, groups = (np.concatenate(x)[:r.num_samples] for x in (feats, scores, groups))
  labels = pseudo_labels(scores[:, :-1], scores[:, -1], r.ratio)

  # ---------------------------------------------------------------- router
  # Training curves per epoch (the x axis), then the summary at the last epoch. The router is
  # retrained from scratch on every run: a rerun replaces all earlier rows.
  writer = metrics.Writer(workdir)
  router = Router(cfg, rngs=nnx.Rngs(config.seed))
  acc = train_router(router, feats, labels, epochs=r.epochs, lr=r.lr, batch_size=r.batch_size,
                     seed=config.seed, on_epoch=lambda epoch, m: writer.write(
                         epoch, {f"router/{k}": v for k, v in m.items()}))
  chosen = np.asarray(jnp.argmax(router(jnp.asarray(feats)), -1))
  n_sa = np.array([len(s) for s in cfg.router.feasible])
  stats = {"samples": int(len(labels)), "router_train_accuracy": acc,
           "label_histogram": np.bincount(labels, minlength=len(n_sa)).tolist()}
  for name in sorted(set(groups.tolist()) - {""}):  # question groups: the records' families
    sel = groups == name
    stats[f"mean_sa_label_{name}"] = float(n_sa[labels[sel]].mean())
    stats[f"mean_sa_router_{name}"] = float(n_sa[chosen[sel]].mean())
  metrics.log("router: %s", stats)
  writer.write(r.epochs, {f"router/{k}": v for k, v in stats.items()
                          if isinstance(v, (int, float))})
  writer.close()

  # ---------------------------------------------------------------- a run with the router
  flat = traverse_util.flatten_dict(jax.device_get(params), sep=".")
  for path, value in traverse_util.flatten_dict(
      nnx.to_pure_dict(nnx.state(router, nnx.Param)), sep=".").items():
    flat["decoder.router." + path] = np.asarray(value)
  out_params = traverse_util.unflatten_dict(flat, sep=".")
  out_config = ml_collections.ConfigDict(run.to_dict())
  out_config.model = model_dict
  out_config.init_from = r.from_workdir
  data_dir = sources.synthetic_dir(run.data, universal.workdir)
  # Evaluation finds the data beside the run (a gs:// run finds it in the local data cache).
  if run.data.source in sources.EMBEDDED and not run.data.synthetic_dir and \
      not paths.is_remote(workdir) and not paths.exists(paths.join(workdir, "synthetic_data")):
    paths.copytree(data_dir, paths.join(workdir, "synthetic_data"))
  ckpt = checkpoints.Checkpointer(workdir, save_every=1, keep=1, async_save=False)
  ckpt.save(0, {"params": out_params, "opt_state": {}, "step": np.int32(0)}, None, out_config,
            model_dict, universal.tokenizer.files,
            image_processor=universal.image_spec.to_hf_dict(), force=True)
  ckpt.close()
  with paths.open(paths.join(workdir, "router_stats.json"), "w") as f:
    json.dump({**stats, "feasible": [list(s) for s in cfg.router.feasible]}, f, indent=2)
  return stats
