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
import optax
from flax import nnx

from visor_jax import optim
from visor_jax.models.llava_onevision import INPUT_KEYS

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


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable:
  def loss_fn(trainable, frozen, batch, budget):
    model = nnx.merge(graphdef, optim.merge(trainable, frozen))
    logits = model({k: batch[k] for k in INPUT_KEYS}, budget)
    loss, n, correct = token_loss(logits, batch["targets"])
    return loss, (n, correct)
  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    labels: dict[str, str], grad_accum: int = 1) -> Callable:
  """(state, batch, budget) → (state, metrics).

  With `grad_accum` = k the batch is split into k micro-batches whose gradients are averaged
  (a `lax.scan`, so memory is that of one micro-batch). A non-finite loss or gradient leaves
  params and optimizer state unchanged and reports `finite = 0`: a NaN never reaches the
  parameters, hence never a checkpoint; the host decides whether to stop.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef), has_aux=True)

  def step(state, batch, budget):
    trainable, frozen = optim.split(state["params"], labels)
    if grad_accum == 1:
      (loss, (n, correct)), grads = grad_fn(trainable, frozen, batch, budget)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
      micro_budget = budget.reshape(grad_accum, -1, budget.shape[-1])

      def accumulate(carry, xs):
        mb, mbud = xs
        (l, (n_, c_)), g = grad_fn(trainable, frozen, mb, mbud)
        acc_g, acc_l, acc_n, acc_c = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, acc_n + n_, acc_c + c_), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, loss, n, correct), _ = jax.lax.scan(
          accumulate, (zeros, 0.0, 0, 0), (micro, micro_budget))
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      loss = loss / grad_accum
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
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
    return new_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """(params, batch, budget) → per-sample answer exact match (teacher forced).

  A sample is correct when the argmax at every supervised position is the target: the whole
  short answer (and its end-of-turn token) would be produced by greedy decoding.
  """
  def step(params, batch, budget):
    model = nnx.merge(graphdef, params)
    logits = model({k: batch[k] for k in INPUT_KEYS}, budget)
    targets = batch["targets"]
    mask = targets >= 0
    hit = (jnp.argmax(logits, -1) == targets) | ~mask
    loss, _, _ = token_loss(logits, targets)
    return {"correct": jnp.all(hit, axis=-1) & jnp.any(mask, axis=-1),
            "has_target": jnp.any(mask, axis=-1), "loss": loss}
  return step


def init_state(params: dict, tx: optax.GradientTransformation, labels: dict[str, str]
               ) -> dict[str, Any]:
  trainable, _ = optim.split(params, labels)
  return {"params": params, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}
