"""Does the budget-switched forward actually run faster, as fast as the FLOPs say? And are we
as fast as transformers' PyTorch LLaVA-OV on the same input?

Why this exists: VISOR's speed-up only materialises if a layer whose SA bit is off really
skips its visual work inside ONE compiled program (the budget is data, `lax.switch` in a
`lax.scan`). This times that program on this CPU for several budgets, compares each measured
speed-up with the analytic FLOPs ratio (`visor_jax.flops`), and times transformers'
`LlavaOnevisionForConditionalGeneration` (random weights, same shapes) as the reference.

The model: LLaVA-OV 0.5B widths (Qwen2 896 wide, 14/2 heads, FFN 4864, vocab 152k; SigLIP
1152 wide, 384² crops of 14 px patches) with fewer layers so that one forward takes seconds on
2 cores: `--layers` LLM layers (CA on every third from 0, every other layer an SA candidate)
and `--vision_layers` SigLIP layers. Timings: prefill logits for the text tokens,
`block_until_ready`, median of `--repeats` runs after one warm-up, runs interleaved and runs
disturbed by other processes re-run (see `interleaved_medians`). About 2.5 minutes on an idle
2-core machine with the defaults.

Run: python -m visor_jax.benchmarks.forward_speed [--image_size=384] [--text_len=64]
     [--layers=6] [--vision_layers=4] [--repeats=3] [--skip_torch]
     [--attention_impl=xla|blockwise] [--layouts=serving --layouts=stacked]

Both layer-weight layouts are timed in one interleaved group: serving (`visor.serving_layout`,
what the Generator serves with) and stacked (the scanned training layout, which copies each
layer's weights out of the stack on every call). The compute floor is the analytic FLOPs at
the rate of one large float32 matmul timed beside the forwards: no forward runs faster.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from visor_jax import budgets, config_lib, flops, model_configs
from visor_jax.benchmarks import transformers_ref
from visor_jax.config_lib import ModelConfig
from visor_jax.data import inputs as inputs_lib
from visor_jax.models import visor
from visor_jax.models.llava_onevision import LlavaOnevision

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 384, "Square image side in pixels (384: 2 crops, 1485 "
                     "visual tokens at 0.5B geometry).")
flags.DEFINE_integer("text_len", 64, "Text tokens in the prompt (the image placeholder "
                     "follows the first 3 of them, as in LLaVA-OV's chat template).")
flags.DEFINE_integer("layers", 6, "LLM layers (0.5B has 24).")
flags.DEFINE_integer("vision_layers", 4, "SigLIP layers (0.5B has 26).")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
flags.DEFINE_list("sa_counts", ["0", "2", "4"], "VISOR budgets: numbers of SA layers "
                  "(budgets.spread_layers), besides the full all-SA budget.")
flags.DEFINE_bool("skip_torch", False, "Skip the transformers (PyTorch) reference timings.")
flags.DEFINE_bool("skip_bf16", False, "Skip the bfloat16 timings.")
LAYOUTS = {"serving": "one module per layer, kernels [out, in] (`visor.serving_layout`)",
           "stacked": "stacked, scanned (training and checkpoints)"}
flags.DEFINE_multi_enum("layouts", list(LAYOUTS), list(LAYOUTS),
                        "Layer-weight layouts to time (the first is compared with transformers).")
flags.DEFINE_enum("attention_impl", "blockwise", ["xla", "blockwise"],
                  "Our attention (`model.attention_impl`; 'blockwise' is the CPU default).")

PROMPT_PREFIX = 3  # text tokens before the image placeholder


def bench_model_config(layers: int, vision_layers: int) -> Any:
  """`config.model` at 0.5B widths and the given depths.

  CA on every third layer from 0 (as 0.5B); every non-CA layer is an SA candidate (0.5B has
  only every third from 1), so a 6-layer model offers budgets of 0..4 SA layers.
  """
  m = model_configs.llava_ov_0_5b()
  m.text.num_layers = layers
  m.vision.num_layers = vision_layers
  ca = config_lib.uniform_layers(layers, 3, 0)
  m.visor.ca_layers = list(ca)
  m.visor.sa_candidates = [i for i in range(layers) if i not in ca]
  return m


def build_input(cfg: ModelConfig, image_size: int, text_len: int, seed: int = 0):
  """A random image and prompt → (our collated batch, the Sample, token ids with placeholder,
  the image)."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
  words = rng.integers(0, cfg.image_token_id, text_len).tolist()
  token_ids = words[:PROMPT_PREFIX] + [cfg.image_token_id] + words[PROMPT_PREFIX:]
  sample = inputs_lib.build_sample(token_ids, [image], cfg)
  return inputs_lib.collate([sample]), sample, token_ids, image


OTHERS_LIMIT = 0.2        # a run is clean if other processes used < 20% of the cores' time
MAX_ATTEMPTS = 2          # runs per wanted run at most: bounds the time under load


@dataclasses.dataclass
class Timing:
  """Median wall seconds over the clean runs, and how many runs were disturbed."""
  seconds: float
  clean: int
  disturbed: int


MATMUL = (1549, 896, 4864)  # the LLM MLP's shape at 1,549 tokens: XLA's best rate on this CPU


def matmul_fn() -> Callable[[], Any]:
  """One float32 MATMUL-shaped matmul, to time beside the forwards: its rate (FLOPs / time)
  is the most any forward's FLOPs can average here."""
  rng = np.random.default_rng(0)
  m, k, n = MATMUL
  x, w = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((m, k), (k, n)))
  f = jax.jit(jnp.dot)
  return lambda: f(x, w)


def busy_cpu_seconds() -> float | None:
  """CPU seconds every process on the machine has used (Linux /proc/stat; None elsewhere)."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()[1:]
  except OSError:
    return None
  user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_share(wall: float, own_cpu: float, busy: float | None, cores: int) -> float:
  """The share of the cores' time during a run that went to other processes: (machine busy
  time - this process's) / (wall x cores). Measured on the machine, not inferred from this
  process's own use, so a program that keeps only one core busy is not "disturbed"."""
  if busy is None:  # no /proc/stat: nothing is known about the others
    return 0.0
  return max(0.0, busy - own_cpu) / max(wall * cores, 1e-9)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
  """Median wall seconds of each `fn()` after one warm-up run each, on a shared machine.

  Runs are interleaved round-robin (a, b, c, a, b, c, ...) so slow drift hits every
  measurement alike. A run during which other processes used more than `OTHERS_LIMIT` of the
  cores' time (`others_share`) is counted as disturbed and re-run, up to
  `MAX_ATTEMPTS × repeats` runs; if too few clean runs remain, the median of all runs is
  reported and `Timing.clean < repeats` says so.
  """
  cores = os.cpu_count() or 1
  for fn in fns.values():
    jax.block_until_ready(fn())
  clean: dict[str, list[float]] = {name: [] for name in fns}
  every: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(MAX_ATTEMPTS * repeats):
    pending = [name for name in fns if len(clean[name]) < repeats]
    if not pending:
      break
    for name in pending:
      busy, wall, cpu = busy_cpu_seconds(), time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[name]())
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      busy = None if busy is None else busy_cpu_seconds() - busy
      every[name].append(wall)
      if others_share(wall, cpu, busy, cores) < OTHERS_LIMIT:
        clean[name].append(wall)
  out = {}
  for name in fns:
    ok = len(clean[name]) >= repeats
    out[name] = Timing(statistics.median(clean[name] if ok else every[name]),
                       clean=len(clean[name]), disturbed=len(every[name]) - len(clean[name]))
  return out


@dataclasses.dataclass
class OurPrograms:
  """Jitted pure functions of (params, inputs[, ...]); one compilation serves every budget."""
  forward: Callable    # (state, inputs, budget) → logits float32[B, T, V]
  vision: Callable     # (state, inputs) → packed visual tokens float[B, N, D]
  llm: Callable        # (state, inputs, vis, budget) → logits: the LLM part alone


def our_programs(model: LlavaOnevision) -> OurPrograms:
  """Split once and jit pure functions, so no per-call NNX graph traversal is timed."""
  graphdef = nnx.graphdef(model)

  def vision(state, x):
    m = nnx.merge(graphdef, state)
    return m.visual_tokens(x["pixels"], x["vis_src"], x["vis_weight"], x["vis_newline"])

  def llm(state, x, vis, budget):
    m = nnx.merge(graphdef, state)
    text = m.embed[...][x["tokens"]].astype(m.dtype)
    out = m.decoder(text, vis, x["text_pos"], x["vis_pos"], x["text_valid"], x["vis_valid"],
                    budget)
    hidden = out[0] if isinstance(out, tuple) else out  # (hidden, budget, router logits)
    return m.logits(hidden)

  return OurPrograms(forward=jax.jit(lambda st, x, b: nnx.merge(graphdef, st)(x, b)),
                     vision=jax.jit(vision), llm=jax.jit(llm))


def our_fns(model: LlavaOnevision, batch, rows: Sequence[dict], llm_too: bool = True
            ) -> tuple[dict[str, Callable[[], Any]], OurPrograms]:
  """Closures to time: 'vision' and, per budget row, '<name>/forward' (and '<name>/llm')."""
  progs = our_programs(model)
  state = nnx.state(model)
  x = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()})
  vis = jax.block_until_ready(progs.vision(state, x))
  fns = {"vision": lambda: progs.vision(state, x)}
  for row in rows:
    b = jnp.asarray(row["budget"])
    fns[row["name"] + "/forward"] = lambda b=b: progs.forward(state, x, b)
    if llm_too:
      fns[row["name"] + "/llm"] = lambda b=b: progs.llm(state, x, vis, b)
  return fns, progs


def compilations(progs: OurPrograms) -> int:
  """Programs compiled per jitted function (1: every budget ran the same program)."""
  sizes = [f._cache_size() for f in (progs.forward, progs.llm) if hasattr(f, "_cache_size")]
  return max(sizes) if sizes else -1


def torch_fns(model_cfg: Any, sample, token_ids: Sequence[int], image: np.ndarray,
              dtypes: Sequence[str]) -> dict[str, Callable[[], Any]]:
  """transformers' LLaVA-OV forward (random weights, sdpa) on the same prompt and crops.

  input_ids: the placeholder expanded to the sample's visual token count (as
  tests/test_hf_equivalence.py does); pixel_values: our crops as NCHW with image_sizes;
  logits only at the text positions (`logits_to_keep`), like our forward; no KV cache.
  One model copy per dtype, so their runs can be interleaved with ours.
  """
  import torch

  f32, kw, pixels = transformers_ref.model_and_inputs(model_cfg, sample, token_ids, image)
  kw.update(logits_to_keep=torch.as_tensor(sample.text_pos, dtype=torch.long), use_cache=False)
  fns = {}
  for name in dtypes:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    model = f32 if dtype == torch.float32 else copy.deepcopy(f32).to(dtype)
    px = pixels.to(dtype)

    def run(model=model, px=px):
      with torch.inference_mode():
        return model(pixel_values=px, **kw).logits

    assert run().shape[-2] == len(sample.tokens)
    fns[f"transformers {name} (sdpa)"] = run
  return fns


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def budget_rows(cfg: ModelConfig, sa_counts: Sequence[int]) -> list[dict]:
  """The full budget (every layer SA: LLaVA-OV) and k SA layers spread over the candidates."""
  rows = [dict(name=f"full (all {cfg.num_layers} SA)", budget=budgets.all_sa(cfg))]
  for k in sa_counts:
    budget = budgets.mask(cfg, budgets.spread_layers(cfg.visor.sa_candidates, k))
    rows.append(dict(name=f"{k} SA {budgets.label(budgets.layers_of(budget[0]))}", budget=budget))
  return rows


def _ms(t: Timing) -> str:
  """'1234' or '1234*' when too few undisturbed runs were had."""
  return f"{t.seconds * 1e3:.0f}" + ("" if t.clean >= FLAGS.repeats else "*")


def flagged_model_and_input() -> tuple[Any, ModelConfig, tuple]:
  """(`config.model`, its ModelConfig, `build_input`'s batch, sample, token ids, image) from the
  flags --layers, --vision_layers, --attention_impl, --image_size, --text_len (shared with
  `component_split`)."""
  model_cfg = bench_model_config(FLAGS.layers, FLAGS.vision_layers)
  model_cfg.attention_impl = FLAGS.attention_impl
  cfg = config_lib.model_config(model_cfg)
  return model_cfg, cfg, build_input(cfg, FLAGS.image_size, FLAGS.text_len)


def main(argv: Sequence[str]) -> None:
  del argv
  t_start = time.perf_counter()
  model_cfg, cfg, (batch, sample, token_ids, image) = flagged_model_and_input()
  crops, n_vis, n_text = len(sample.pixels), sample.num_visual_tokens, len(sample.tokens)
  rows = budget_rows(cfg, [int(k) for k in FLAGS.sa_counts])
  shape = dict(num_crops=crops, num_visual=n_vis, num_text=n_text)
  for row in rows:
    row["flops"] = flops.forward_flops(
        cfg, sa_layers=budgets.layers_of(row["budget"][0]), **shape)
  full = rows[0]["flops"]

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {_load()}")
  print(f"Model: LLaVA-OV 0.5B widths, {cfg.num_layers} LLM layers (CA {list(cfg.visor.ca_layers)}"
        f", SA candidates {list(cfg.visor.sa_candidates)}), {cfg.vision.num_layers} SigLIP "
        f"layers, random weights; attention_impl={FLAGS.attention_impl!r}.")
  print(f"Input: {FLAGS.image_size}x{FLAGS.image_size} image -> {crops} crops, {n_vis} visual "
        f"tokens; {n_text} text tokens; batch 1. Median of {FLAGS.repeats} undisturbed runs "
        "after a warm-up, interleaved.")
  print(f"Analytic full forward: {full['total'] / 1e9:.0f} GFLOPs (vision tower + projector "
        f"{(full['vision'] + full['projector']) / 1e9:.0f}, LLM {full['llm'] / 1e9:.0f}).")

  base = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
  models = {"serving": visor.serving_layout(base), "stacked": base}
  fns, progs = {}, {}
  for layout in FLAGS.layouts:
    layout_fns, progs[layout] = our_fns(models[layout], batch, rows)
    fns.update({f"{layout} {name}": fn for name, fn in layout_fns.items()
                if name != "vision" or not fns})
  ours = interleaved_medians(fns, FLAGS.repeats)
  vision = ours[next(iter(fns))]
  print(f"\nOurs, float32, budget as data: "
        f"{max(compilations(p) for p in progs.values())} compilation(s) per function for all "
        f"budgets. Vision tower + projector + packing alone: {_ms(vision)} ms.")
  for layout in FLAGS.layouts:
    print(f"\nLayer weights: {LAYOUTS[layout]}")
    key = lambda row, k: f"{layout} {row['name']}/{k}"  # noqa: E731
    t_full = {k: ours[key(rows[0], k)].seconds for k in ("forward", "llm")}
    header = (f"{'budget':<20} {'fwd ms':>7} {'speed-up':>8} {'FLOPs':>6} {'ratio':>5} | "
              f"{'LLM ms':>7} {'speed-up':>8} {'FLOPs':>6} {'ratio':>5}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
      t = {k: ours[key(row, k)] for k in ("forward", "llm")}
      f = row["flops"]
      sp, an = t_full["forward"] / t["forward"].seconds, full["total"] / f["total"]
      sp_llm, an_llm = t_full["llm"] / t["llm"].seconds, full["llm"] / f["llm"]
      print(f"{row['name']:<20} {_ms(t['forward']):>7} {sp:>7.2f}x {an:>5.2f}x {sp / an:>5.2f} | "
            f"{_ms(t['llm']):>7} {sp_llm:>7.2f}x {an_llm:>5.2f}x {sp_llm / an_llm:>5.2f}")
  print("fwd: whole forward (vision tower .. logits). LLM: decoder + lm head on precomputed "
        "visual tokens.\nspeed-up: measured vs the full budget; FLOPs: analytic speed-up "
        "(visor_jax.flops.forward_flops); ratio: measured / analytic (target >= 0.9).")

  # Full budget against transformers, all runs interleaved in one group (same conditions).
  layout = FLAGS.layouts[0]
  full_fwd = f"{rows[0]['name']}/forward"
  compare = {"ours float32": fns[f"{layout} {full_fwd}"]}
  if not FLAGS.skip_bf16:  # bfloat16 compute over the same float32 weights
    bf16_cfg = dataclasses.replace(cfg, dtype="bfloat16")
    bf16 = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LlavaOnevision(bf16_cfg,
                                                                         rngs=nnx.Rngs(0)))),
                     nnx.state(base))
    bf16 = visor.serving_layout(bf16) if layout == "serving" else bf16
    bf16_fns, _ = our_fns(bf16, batch, rows[:1], llm_too=False)
    compare["ours bfloat16 (float32 params)"] = bf16_fns[full_fwd]
  if not FLAGS.skip_torch:
    compare.update(torch_fns(model_cfg, sample, token_ids, image,
                             ["float32"] + ([] if FLAGS.skip_bf16 else ["bfloat16"])))
  matmul = " x ".join(map(str, MATMUL))
  compare[f"one matmul {matmul}"] = matmul_fn()
  vs = interleaved_medians(compare, FLAGS.repeats)
  rate = 2 * np.prod(MATMUL) / vs.pop(f"one matmul {matmul}").seconds
  print("\nFull budget (= LLaVA-OV) vs transformers' LlavaOnevisionForConditionalGeneration:")
  for name, t in vs.items():
    print(f"  {name:<32} {_ms(t):>7} ms")
  for ours_name, torch_name, target in (
      ("ours float32", "transformers float32 (sdpa)", " (target <= 0.75)"),
      ("ours bfloat16 (float32 params)", "transformers bfloat16 (sdpa)", "")):
    if ours_name in vs and torch_name in vs:
      print(f"  {ours_name} / {torch_name} = "
            f"{vs[ours_name].seconds / vs[torch_name].seconds:.2f}{target}")
  floor = full["total"] / rate
  print(f"  compute floor: {1e3 * floor:.0f} ms (the forward's {full['total'] / 1e9:.0f} GFLOPs "
        f"at the rate of one {matmul} float32 matmul timed in this "
        f"group, {rate / 1e9:.0f} GFLOP/s)")
  if "transformers float32 (sdpa)" in vs:
    theirs = vs["transformers float32 (sdpa)"].seconds
    print(f"  compute floor / transformers float32 = {floor / theirs:.2f} (0.75x would take "
          f"{full['total'] / (0.75 * theirs) / 1e9:.0f} GFLOP/s over the whole forward)")
  disturbed = sum(t.disturbed for t in list(ours.values()) + list(vs.values()))
  print(f"\n{disturbed} run(s) disturbed by other processes were re-run; '*' marks a median "
        f"over disturbed runs. Wall time {time.perf_counter() - t_start:.0f} s; load average "
        f"{_load()}.")


if __name__ == "__main__":
  app.run(main)
