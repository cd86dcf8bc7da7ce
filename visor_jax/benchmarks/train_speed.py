"""Train-step time per budget next to the FLOPs ratio; input-pipeline throughput vs step time.

    python -m visor_jax.benchmarks.train_speed [--layers=8] [--vision_layers=4] [--repeats=3]

Part 1: a reduced LLaVA-OV 0.5B (0.5B widths, fewer layers; random weights; one 384x384
image + 64 text tokens per sample, batch 1): the compiled train step for the all-SA budget and
0, 2, 4 SA layers — one compilation, the budget is an argument.
Part 2: the default CPU run's setup (the small model on synthetic data): the grain pipeline's
batches/s against the train step's steps/s, so the input is shown not to be the bottleneck.
"""
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from visor_jax import budgets, config_lib, flops
from visor_jax.data import sources
from visor_jax.training import config as train_config
from visor_jax.training import optim, steps
from visor_jax.benchmarks.generate_speed import reduced_config
from visor_jax.data import inputs, pipeline, synthetic
from visor_jax.data.tokenizer import build_tiny_tokenizer
from visor_jax.models.llava_onevision import LlavaOnevision

FLAGS = flags.FLAGS  # --layers, --vision_layers, --repeats: defined by generate_speed


def _step_fn(cfg, batch_size):
  graphdef, params = nnx.split(LlavaOnevision(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
  o = train_config.default().optim
  labels = optim.param_labels(params, o.param_groups)
  tx = optim.make_optimizer(o, labels, 100)
  state = steps.init_state(params, tx, labels)
  return jax.jit(steps.make_train_step(graphdef, tx, labels), donate_argnums=0), state


def _time(step, state, batch, budget, repeats):
  state, m = step(state, batch, budget)  # compile (first budget) / warm up
  jax.block_until_ready(m)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = step(state, batch, budget)
    jax.block_until_ready(m)
    best = min(best, time.perf_counter() - t0)
  return best, state


def per_budget():
  cfg = reduced_config()
  step, state = _step_fn(cfg, 1)
  rng = np.random.default_rng(0)
  ids = list(rng.integers(0, 1000, 64)) + [cfg.image_token_id] + [11, 12]
  sample = inputs.build_sample(ids, [rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)], cfg)
  batch = inputs.collate([sample])
  batch["targets"] = np.where(np.arange(batch["tokens"].shape[1]) > 40, batch["tokens"], -1)
  rows = {"all SA (LLaVA-OV)": budgets.all_sa(cfg)}
  rows.update({f"{k} SA": budgets.mask(cfg, budgets.spread_layers(cfg.visor.sa_candidates, k)) for k in (0, 2, 4)})
  print(f"Part 1: reduced LLaVA-OV 0.5B ({cfg.num_layers} LLM, {cfg.vision.num_layers} SigLIP "
        f"layers), {sample.num_visual_tokens} visual + {len(sample.tokens)} text tokens, f32")
  times, fl = {}, {}
  for name, row in rows.items():
    times[name], state = _time(step, state, batch, row, FLAGS.repeats)
    f = flops.forward_flops(cfg, num_crops=len(sample.pixels), num_visual=sample.num_visual_tokens,
                            num_text=len(sample.tokens), sa_layers=np.flatnonzero(row[0]))
    fl[name] = f["total"]
  base = "all SA (LLaVA-OV)"
  print(f"{'budget':<18} {'step s':>7} {'speed-up':>8} {'FLOPs x':>8} {'measured/FLOPs':>14}")
  for name in rows:
    speed, ratio = times[base] / times[name], fl[base] / fl[name]
    print(f"{name:<18} {times[name]:7.2f} {speed:8.2f} {ratio:8.2f} {speed / ratio:14.2f}")
  print(f"compilations of the train step: {step._cache_size()}")


def pipeline_vs_step():
  c = train_config.default("small")
  cfg = config_lib.model_config(c.model)
  d = os.path.join(tempfile.mkdtemp(), "synthetic")
  sizes = dict(train=64, validation=4, test=4)
  synthetic.build(d, seed=0, sizes=sizes)
  tok = build_tiny_tokenizer(synthetic.corpus(), vocab_size=300)
  kw = dict(sources.pipeline_kwargs(c.data), num_epochs=None)
  it = pipeline.make_iterator(synthetic.records("train", d, seed=0, sizes=sizes), tok, cfg, kw)
  batches_per_s = pipeline.measure_throughput(it, 20)
  batch = {k: v for k, v in next(it).items() if k not in pipeline.HOST_FIELDS}
  step, state = _step_fn(cfg, c.data.batch_size)
  t, _ = _time(step, state, batch, budgets.mask(cfg, [1, 4], c.data.batch_size),
               FLAGS.repeats)
  print(f"Part 2: default CPU run (small model, batch {c.data.batch_size}, synthetic 768-1536 px)"
        f": input pipeline {batches_per_s:.1f} batches/s (1 process) vs train step "
        f"{1 / t:.2f} steps/s → the input is {batches_per_s * t:.0f}x faster than the step")


def main(_):
  per_budget()
  pipeline_vs_step()


if __name__ == "__main__":
  app.run(main)
