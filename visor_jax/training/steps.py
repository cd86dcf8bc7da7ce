"""The compiled functions of training: loss, update step (with gradient accumulation and a
non-finite guard) and the teacher-forced eval step. Pure functions of pytrees, so `train.py`
can jit them with explicit shardings and tests can call them directly.

Train state: {'params': nested dict, 'opt_state': optax state of the trainable part,
'step': int32}. The budget (bool[B, L]) is an argument like the batch: one compilation serves
every budget.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from visor_jax import budgets as budgets_lib
from visor_jax import distributed, sharding
from visor_jax.data import pipeline
from visor_jax.models import token_reduction as tr
from visor_jax.models.llava_onevision import INPUT_KEYS
from visor_jax.training import hop_loss, optim

Array = jax.Array


def token_loss(logits: Array, targets: Array) -> tuple[Array, Array, Array]:
  """Mean next-token cross-entropy over supervised tokens (targets >= 0).

  logits float32[B, T, V]; targets int32[B, T] → (loss, #tokens, #correct tokens).
  """
  mask = targets >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
  n = jnp.sum(mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) & mask)
  return jnp.sum(ce * mask) / jnp.maximum(n, 1), n, correct


def answer_exact(logits: Array, targets: Array) -> Array:
  """bool[B]: teacher-forced answer exact match. True when the argmax at every supervised
  position is its target (greedy decoding would reproduce the whole answer and its end of
  turn) and the sample has a target at all. Shared by the eval step and router training."""
  mask = targets >= 0
  hit = (jnp.argmax(logits, -1) == targets) | ~mask
  return jnp.all(hit, axis=-1) & jnp.any(mask, axis=-1)


def forward(model, inputs, budget, reduction: tr.Reduction | None = None) -> Array:
  """Logits of the model at `budget`, or of VISOR-TR (`reduction`, method 'visor_tr': the
  visual tokens pooled before VISOR's layers, `models/token_reduction.py`) at that budget."""
  if reduction is None:
    return model(inputs, budget)
  return tr.reduced_forward(model, inputs, reduction, budget).logits


def make_loss_fn(graphdef: nnx.GraphDef, reduction: tr.Reduction | None = None,
                 hop: hop_loss.Spec | None = None) -> Callable:
  """(trainable, frozen, batch, budget) → (loss, (#tokens, #correct, token loss, hop loss)).
  The loss is the token loss, plus `hop.weight` x the hop loss (`hop_loss.py`) when given."""
  if hop is not None and reduction is not None:
    raise ValueError("the hop loss reads the page layout, which VISOR-TR's pooling removes.")

  def loss_fn(trainable, frozen, batch, budget):
    model = nnx.merge(graphdef, optim.merge(trainable, frozen))
    if hop is None:
      logits = forward(model, {k: batch[k] for k in INPUT_KEYS}, budget, reduction)
      hop_value, weight = jnp.zeros((), jnp.float32), 0.0
    else:
      logits, hop_value = hop_loss.forward(model, batch, budget, hop.layers, hop.grid)
      weight = hop.weight
    loss, n, correct = token_loss(logits, batch["targets"])
    return loss + weight * hop_value, (n, correct, loss, hop_value)
  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    labels: dict[str, str], grad_accum: int = 1,
                    reduction: tr.Reduction | None = None,
                    hop: hop_loss.Spec | None = None) -> Callable:
  """(state, batch, budget) → (state, metrics).

  With `grad_accum` = k the batch is split into k micro-batches whose gradients are averaged
  (a `lax.scan`, so memory is that of one micro-batch). A non-finite loss or gradient leaves
  params and optimizer state unchanged and reports `finite = 0`: a NaN never reaches the
  parameters, hence never a checkpoint; the host decides whether to stop.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, reduction, hop), has_aux=True)

  def step(state, batch, budget):
    trainable, frozen = optim.split(state["params"], labels)
    if grad_accum == 1:
      (total, (n, correct, loss, hop_value)), grads = grad_fn(trainable, frozen, batch, budget)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
      micro_budget = budget.reshape(grad_accum, -1, budget.shape[-1])

      def accumulate(carry, xs):
        mb, mbud = xs
        (t_, (n_, c_, l_, h_)), g = grad_fn(trainable, frozen, mb, mbud)
        acc_g, acc_t, acc_n, acc_c, acc_l, acc_h = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_t + t_, acc_n + n_, acc_c + c_,
                acc_l + l_, acc_h + h_), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, total, n, correct, loss, hop_value), _ = jax.lax.scan(
          accumulate, (zeros, 0.0, 0, 0, 0.0, 0.0), (micro, micro_budget))
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      total, loss, hop_value = total / grad_accum, loss / grad_accum, hop_value / grad_accum
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "params": optim.merge(keep(new_trainable, trainable), frozen),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32),
               "tokens": n, "correct_tokens": correct}
    if hop is not None:
      metrics["hop_loss"] = hop_value
    return new_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, reduction: tr.Reduction | None = None) -> Callable:
  """(params, batch, budget) → {'tf_exact' bool[B] (`answer_exact`), 'has_target' bool[B],
  'loss' (mean over the batch's supervised tokens)}."""
  def step(params, batch, budget):
    model = nnx.merge(graphdef, params)
    logits = forward(model, {k: batch[k] for k in INPUT_KEYS}, budget, reduction)
    loss, _, _ = token_loss(logits, batch["targets"])
    return {"tf_exact": answer_exact(logits, batch["targets"]),
            "has_target": jnp.any(batch["targets"] >= 0, axis=-1), "loss": loss}
  return step


def teacher_forced_eval(eval_step: Callable, params, batches: list[dict],
                        layer_sets: list[list[int]], cfg, mesh) -> dict:
  """{budget label: {'tf_exact', 'loss', 'n', 'tf_exact/<group>'...}} over `batches`: training
  metrics, not the accuracy (that is the evaluation harness's, on generated answers). The
  per-group rows (the batch's host-side `group`, e.g. a pages family) show which question
  family a run has learned while it trains."""
  results = {}
  for layers in layer_sets:
    exact, groups, losses = [], [], []
    for batch in batches:
      mask = sharding.global_rows(budgets_lib.mask(cfg, layers, batch["tokens"].shape[0]), mesh)
      out = eval_step(params, sharding.to_global(batch, mesh, pipeline.HOST_FIELDS), mask)
      # This host's rows (with several processes the batch axis spans hosts); the rows of
      # all hosts are gathered below, each counted once.
      has = distributed.local_rows(out["has_target"]).astype(bool)
      exact.extend(distributed.local_rows(out["tf_exact"])[has].tolist())
      group = batch.get("group")
      groups.extend(np.asarray(group, object)[has].tolist() if group is not None
                    else [None] * int(has.sum()))
      losses.append(float(jax.device_get(out["loss"])))
    gathered = distributed.allgather_json([exact, groups])
    exact = np.array([e for host in gathered for e in host[0]], bool)
    groups = np.array([g for host in gathered for g in host[1]], object)
    r = {"tf_exact": float(exact.mean()) if len(exact) else float("nan"),
         "loss": float(np.mean(losses)) if losses else float("nan"), "n": int(len(exact))}
    for g in sorted({g for g in groups if g}):
      r[f"tf_exact/{g}"] = float(exact[groups == g].mean())
    results[budgets_lib.label(layers)] = r
  return results


def init_state(params: dict, tx: optax.GradientTransformation, labels: dict[str, str]
               ) -> dict[str, Any]:
  trainable, _ = optim.split(params, labels)
  return {"params": params, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}
