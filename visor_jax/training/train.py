"""The trainer: one linear `_train()` in banner sections (big_vision style), behind `main()`,
which holds the SIGTERM handler from its first line (`_Preempted`).

path checks → mesh → data → model shapes → sharding → update step → restore → loop → eval.
Everything a section needs comes from the config; the budget of each step is sampled on the
host (a pure function of seed and step) and enters the one compiled step as data.

Evaluation at the end is the evaluation harness's (generated answers scored by
`evaluation/metrics.py`, the same numbers `python -m visor_jax.evaluation.main` prints) on
`config.eval_items` validation items. Teacher-forced answer exact match and the eval loss are
training metrics (`eval/<budget>/tf_exact`, `eval/<budget>/loss`), every `eval_every` steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal

import jax
import ml_collections
import numpy as np
from flax import nnx

from visor_jax import budgets as budgets_lib
from visor_jax import checkpoints, config_lib, distributed, paths, runs, sharding
from visor_jax.data import elastic, pipeline, sources
from visor_jax.evaluation import main as eval_main
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax.models import token_reduction as tr
from visor_jax.training import hop_loss, metrics, optim, steps

log = logging.getLogger(__name__)


class _StartupPreempted(BaseException):
  """SIGTERM before the first step. A BaseException, like KeyboardInterrupt, so that no library's
  `except Exception` swallows it."""


class _Preempted:
  """SIGTERM (TPU preemption), installed first thing. During startup (data build, restore,
  compiles) it raises `_StartupPreempted` at once: no step has run, so nothing needs saving and
  the grace period is better spent exiting (a dataset build is atomic: tfds renames a finished
  build into place). From `arm()` on (the loop), it sets a flag; the loop checkpoints the step
  in flight and exits. Either way the process exits 0; rerunning the command resumes."""

  def __init__(self):
    self.flag = False
    self._armed = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def arm(self) -> None:
    self._armed = True

  def _handler(self, signum, frame):
    if not self._armed:
      raise _StartupPreempted()
    log.warning("SIGTERM received: will checkpoint and exit after this step.")
    self.flag = True

  def uninstall(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def _eval_scalars(results: dict) -> dict:
  """TensorBoard-safe names: 'SA{1,4}' → 'eval/SA_1_4/tf_exact'."""
  return {f"eval/{budgets_lib.file_label(label)}/{k}": v for label, r in results.items()
          for k, v in r.items() if isinstance(v, (int, float))}


@dataclasses.dataclass
class TrainResult:
  state: dict            # the final train state (sharded arrays); {} if preempted at startup
  eval: dict             # the harness's summary ({'runs': [...]}); empty if preempted/skipped
  teacher_forced: dict   # {budget label: {'tf_exact', 'loss', 'n'}} of the last eval
  preempted: bool = False


def main(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains, checkpoints, evaluates; prints and returns the eval table's results."""
  preempted = _Preempted()  # first: a preemption may come during the data build or compiles
  try:
    with contextlib.ExitStack() as scope:  # holds the mesh context, restored on the way out
      return _train(config, workdir, preempted, scope)
  except _StartupPreempted:
    metrics.log("preempted during startup (SIGTERM before the first step): no step ran, "
                "nothing to checkpoint; exiting")
    return TrainResult({}, {}, {}, preempted=True)
  finally:
    preempted.uninstall()


def _no_teacher_forced_reason(config) -> str:
  if config.data.source == "json" and not config.data.eval_json_path:
    return f"data.eval_json_path is not set for this source={config.data.source!r} run"
  return "the validation split gave no batch"


def state_shardings(abstract_state: dict, param_sh: dict, mesh) -> dict:
  """The train state's shardings: params as `param_sh`; every optimizer-state leaf that mirrors
  a parameter (AdamW's mu and nu: the trailing dict keys of its path are that parameter's
  path, and the shapes agree) as that parameter; the rest (counts, the step) replicated.
  Not read off a compiled init: `zeros_like` has no data dependence on the parameter, so
  sharding propagation left the moments replicated (P()) on every device."""
  by_path = {tuple(k.key for k in path): s for path, s in
             jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  shapes = {tuple(k.key for k in path): x.shape for path, x in
            jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}

  def like_param(path, x):
    keys = []
    for k in reversed(path):  # the trailing run of dict keys: a parameter's path, if any
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    keys = tuple(keys)
    if keys in by_path and shapes[keys] == x.shape:
      return by_path[keys]
    return sharding.replicated(mesh)

  return {**jax.tree_util.tree_map_with_path(like_param, abstract_state),
          "params": param_sh}


def visor_tr_reduction(config) -> tr.Reduction | None:
  """VISOR-TR (the paper's variant): visual tokens pooled 1/keep-fold before VISOR's layers."""
  keep = config.get("visor_tr_keep", 1.0)
  return tr.Reduction("visor_tr", keep) if keep != 1.0 else None


def jit_train_step(config, graphdef, tx, labels, reduction, state_sh, budget_sh, mesh):
  """The jitted update step (training/steps.py) with the train state's shardings, donated; the
  trainer and the dry run (training/dry_run.py) compile this one."""
  return jax.jit(steps.make_train_step(graphdef, tx, labels, config.grad_accum, reduction,
                                       hop_loss.spec(config)),
                 in_shardings=(state_sh, None, budget_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def _lr_schedules(o, labels: dict[str, str], num_steps: int) -> dict[str, np.ndarray]:
  """{scalar name: learning rate per step index}, from the optimizer's own schedules: 'lr' when
  every trained group has the same, else 'lr/<group>'. (A skipped non-finite update does not
  advance optax's count; the logged value is the schedule's at the step regardless.)"""
  groups = sorted({g for g in labels.values() if g != optim.FROZEN})
  lr_mult = dict(o.get("lr_mult", {}) or {})
  mult = {g: lr_mult.get(g, 1.0) for g in groups}
  index = np.arange(max(num_steps, 1))
  by_mult = {m: np.asarray(optim.schedule(o, num_steps, m)(index)) for m in set(mult.values())}
  if len(by_mult) == 1:
    return {"lr": by_mult.popitem()[1]}
  return {f"lr/{g}": by_mult[mult[g]] for g in groups}


def _train(config: ml_collections.ConfigDict, workdir: str, preempted: _Preempted,
           scope: contextlib.ExitStack) -> TrainResult:
  # Every path the config names is checked before anything builds or compiles.
  runs.check_experiment_paths(config)
  distributed.initialize(config)
  paths.makedirs(workdir)

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  # The models' activation constraints (sharding.constrain_batch) read this mesh when traced;
  # on the CPU backend two XLA:CPU collective deadlocks are worked around (activation_mesh).
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  scope.enter_context(sharding.activation_mesh(mesh, runs_on_cpu=on_cpu))
  metrics.log("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
              jax.process_count())
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  global_batch_size = config.data.batch_size * jax.process_count()
  if global_batch_size % (data_ways * config.grad_accum):
    raise ValueError(f"data.batch_size={config.data.batch_size} x {jax.process_count()} "
                     f"process(es) must be divisible by mesh data*fsdp={data_ways} "
                     f"x grad_accum={config.grad_accum}.")

  # ---------------------------------------------------------------- data
  model_dict, tokenizer = runs.experiment_model_and_tokenizer(config)
  cfg = config_lib.model_config(model_dict)
  image_spec = runs.experiment_image_spec(config, cfg)  # init_from's preprocessing, if any
  # Checked before compiling; 'all' (every layer SA: the LLaVA-OV base) is a valid budget.
  layer_sets = budgets_lib.resolve(config.budgets, cfg, "budgets", allow_all=True)
  eval_sets = (budgets_lib.resolve(config.eval_budgets, cfg, "eval_budgets", allow_all=True)
               if config.eval_budgets else layer_sets)
  # The embedded datasets are built once, by process 0, in the shared workdir.
  distributed.primary_first(lambda: [sources.source_for(config.data, split, workdir)
                                     for split in ("train", "validation")], "data_built")
  train_iter = sources.train_iterator(config, cfg, tokenizer, workdir, image_spec)
  eval_batches = sources.eval_batches(config, cfg, tokenizer, workdir, image_spec=image_spec)
  # Hosts read their own shard of the validation split and may hold a batch more or less:
  # each eval step is collective, so all take the count the shortest host has.
  eval_batches = eval_batches[:min(distributed.allgather_json(len(eval_batches)))]
  if config.eval_batches and not eval_batches:
    log.warning("no teacher-forced eval (eval/<budget>/tf_exact, loss): %s.",
                _no_teacher_forced_reason(config))

  # ---------------------------------------------------------------- model shapes
  abstract_model = nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model)
  abstract_params = nnx.to_pure_dict(abstract_params)
  labels = optim.param_labels(abstract_params, config.optim.param_groups)
  tx = optim.make_optimizer(config.optim, labels, config.num_steps)
  lr_schedules = _lr_schedules(config.optim, labels, config.num_steps)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      optim.split(abstract_params, labels)[0]))
  metrics.log("parameters: %s total, %s trainable", f"{n_params:,}", f"{n_train:,}")

  # ---------------------------------------------------------------- sharding
  param_sh = sharding.param_shardings(abstract_model, mesh, config.sharding_rules)
  abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx, labels), abstract_params)
  state_sh = state_shardings(abstract_state, param_sh, mesh)
  init_state = jax.jit(lambda p: steps.init_state(p, tx, labels), in_shardings=(param_sh,),
                       out_shardings=state_sh).lower(abstract_params).compile()
  budget_sh = sharding.batch_sharding(mesh, 2)

  # ---------------------------------------------------------------- update step
  reduction = visor_tr_reduction(config)
  train_step = jit_train_step(config, graphdef, tx, labels, reduction, state_sh, budget_sh, mesh)
  eval_step = jax.jit(steps.make_eval_step(graphdef, reduction),
                      in_shardings=(param_sh, None, budget_sh))

  # ---------------------------------------------------------------- restore
  ckpt = checkpoints.Checkpointer(workdir, save_every=config.ckpt_every,
                                  keep=config.keep_ckpts, async_save=config.async_ckpt)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
  if ckpt.latest_step() is not None:
    step = ckpt.latest_step()
    # Each process's data position; remapped when the checkpoint was written by another
    # number of processes (data/elastic.py).
    saved = elastic.saved_states(ckpt.directory, step)
    same_count = len(saved) in (0, jax.process_count())
    state = ckpt.restore(step, abstract_sharded, train_iter if same_count else None)
    if not same_count:
      train_iter.set_state(elastic.remap(saved, jax.process_index(), jax.process_count()))
    metrics.log("resumed from own checkpoint at step %d%s", int(state["step"]), "" if
                same_count else f" (written by {len(saved)} process(es), resumed by "
                f"{jax.process_count()}: data position remapped)")
  else:
    state = init_state(runs.initial_params(config, cfg, param_sh))
  first_step = int(state["step"])
  # Opened at the restored step: a previous attempt's rows after it are dropped, and a finished
  # run's rerun replaces its evaluation's rows (see metrics.Writer).
  writer = metrics.Writer(workdir, first_step,
                          redo=("eval/",) if first_step >= config.num_steps else ())

  def save(step: int, force: bool = False) -> None:
    ckpt.save(step, state, train_iter, config, model_dict, tokenizer.files,
              image_processor=image_spec.to_hf_dict(), force=force)

  def teacher_forced() -> dict:
    if not eval_batches:
      return {}
    results = steps.teacher_forced_eval(eval_step, state["params"], eval_batches, eval_sets,
                                        cfg, mesh)
    writer.write(int(state["step"]), _eval_scalars(results))
    return results

  def budget_for(step: int, batch_size: int) -> tuple[jax.Array, int]:
    i = budgets_lib.sample(layer_sets, config.budget_weights, config.seed, step)
    return sharding.global_rows(budgets_lib.mask(cfg, layer_sets[i], batch_size), mesh), i

  # ---------------------------------------------------------------- loop
  preempted.arm()  # from here a SIGTERM checkpoints the step in flight
  progress = metrics.Progress(first_step, config.num_steps)
  averages = metrics.Averages()
  bad_counts = np.zeros(len(pipeline.BAD_REASONS), np.int64)
  num_truncated = 0  # samples cut at data.max_text_len (data.overlong='truncate')
  tokens_since_log = 0
  compiled_steps = {}  # text bucket shape → the compiled step
  pending = None  # (step, budget index, device metrics): read one step late, so the host
                  # never waits on the device between dispatching two steps

  def finish(pending) -> None:
    nonlocal tokens_since_log
    step, budget_idx, m = pending
    m = jax.device_get(m)
    if not m["finite"]:
      if config.nan_policy == "stop":
        raise FloatingPointError(f"non-finite loss or gradient at step {step}: the update was "
                                 "not applied and no checkpoint holds it.")
      log.warning("step %d: non-finite loss or gradient, update skipped", step)
    averages.add(loss=m["loss"], grad_norm=m["grad_norm"])
    tokens_since_log += int(m["tokens"])
    writer.write(step, {"loss": m["loss"], "grad_norm": m["grad_norm"],
                        **({"hop_loss": m["hop_loss"]} if "hop_loss" in m else {}),
                        "budget": budget_idx, "finite": int(m["finite"]),
                        **{k: float(v[step - 1]) for k, v in lr_schedules.items()}})

  for step in range(first_step, config.num_steps):
    batch = next(train_iter)
    bad_counts += batch["bad_counts"]
    num_truncated += int(np.sum(batch["truncated"] & batch["sample_valid"]))
    budget, budget_idx = budget_for(step, batch["tokens"].shape[0])
    global_batch = sharding.to_global(batch, mesh, pipeline.HOST_FIELDS)
    bucket = batch["tokens"].shape
    if bucket not in compiled_steps:  # once per static text bucket; budgets never recompile
      compiled_steps[bucket] = train_step.lower(state, global_batch, budget).compile()
      mem = compiled_steps[bucket].memory_analysis()
      if mem is not None:
        metrics.log("compiled the train step for batch %s; per-device memory: %.1f MiB "
                    "arguments + %.1f MiB temporaries", bucket,
                    mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)
    state, step_metrics = compiled_steps[bucket](state, global_batch, budget)
    if pending is not None:
      finish(pending)
    pending = (step + 1, budget_idx, step_metrics)
    done = step + 1
    log.debug("step %d: budget %s", done, budgets_lib.label(layer_sets[budget_idx]))

    if done % config.log_every == 0 or done == config.num_steps or preempted.flag:
      finish(pending)
      pending = None
      scalars = progress.update(done, tokens_since_log)
      tokens_since_log = 0
      scalars.update({f"bad/{r}": int(c) for r, c in zip(pipeline.BAD_REASONS, bad_counts)})
      scalars["data/truncated"] = num_truncated
      scalars["compilations"] = len(compiled_steps)
      writer.write(done, scalars)
      # The interval's mean loss is the console's; metrics hold every step's, once per step.
      metrics.log("%s  compilations %d", metrics.format_progress(
          done, config.num_steps, {**averages.compute_and_reset(), **scalars}),
          scalars["compilations"])
    if preempted.flag:
      save(done, force=True)
      ckpt.close()
      writer.close()
      metrics.log("preempted: checkpoint of step %d written; exiting", done)
      return TrainResult(state, {}, {}, preempted=True)
    save(done, force=done == config.num_steps)
    if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
      teacher_forced()
  ckpt.close()

  # ---------------------------------------------------------------- eval
  tf_results = teacher_forced()
  summary = {}
  items, skips = eval_main.training_items(config, workdir)
  if items:
    run = runs.in_memory(config, model_dict, tokenizer, state["params"], workdir,
                         int(state["step"]), image_spec)
    summary = eval_main.evaluate(
        run, items, paths.join(workdir, "eval"), layer_sets=eval_sets, skips=skips,
        batch_size=config.data.batch_size, max_new_tokens=config.eval_max_new_tokens,
        print_fn=print if jax.process_index() == 0 else lambda *_: None)
    writer.write(int(state["step"]), eval_main.scalars(summary))
  writer.close()
  return TrainResult(state, summary, tf_results)
