"""Prefill and per-token decode time per budget, KV-cache bytes, next to the analytic ratios.

    python -m visor_jax.benchmarks.generate_speed [--layers=8] [--vision_layers=4]
        [--image=384x384] [--text=64] [--new_tokens=16]

A reduced LLaVA-OV 0.5B (its widths; fewer LLM and SigLIP layers, stated in the output;
random weights) so one run fits a 2-core CPU in a few minutes. Budgets: all layers SA (the
LLaVA-OV baseline) and 0, 2, 4 SA layers spread over the candidates. Decode is also shown
against its bandwidth floor (the bytes a step must read / the measured read bandwidth) and,
at all SA, against transformers' cached `generate` (benchmarks/decode_floor.py).
"""
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from visor_jax import budgets, config_lib, flops, model_configs
from visor_jax.benchmarks import cpu_model, decode_floor
from visor_jax.data import inputs
from visor_jax.inference.generate import Generator, _layer_tables
from visor_jax.models.llava_onevision import LlavaOnevision

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 8, "LLM layers (CA on 0 and 4, SA candidates the others).")
flags.DEFINE_integer("vision_layers", 4, "SigLIP layers.")
flags.DEFINE_string("image", "384x384", "Image HxW.")
flags.DEFINE_integer("text", 64, "Prompt text tokens.")
flags.DEFINE_integer("new_tokens", 16, "Decoded tokens (the mean step is reported).")
flags.DEFINE_integer("repeats", 3, "Timed runs per budget (the fastest is reported).")
flags.DEFINE_bool("transformers", True, "Also time transformers' cached generate (all SA).")


def reduced_model_dict():
  """LLaVA-OV 0.5B's widths with --layers LLM and --vision_layers SigLIP layers (a
  `config.model` ConfigDict): CA on every 4th layer from 0, the others SA candidates."""
  m = model_configs.llava_ov_0_5b()
  m.text.num_layers = FLAGS.layers
  m.vision.num_layers = FLAGS.vision_layers
  ca = list(range(0, FLAGS.layers, 4))
  m.visor.ca_layers = ca
  m.visor.sa_candidates = [i for i in range(FLAGS.layers) if i not in ca]
  return m


def reduced_config():
  return config_lib.model_config(reduced_model_dict())


def decode_flops(cfg, row: np.ndarray, n_text: int, n_vis: int) -> float:
  """Analytic FLOPs of one decode step (matmuls + attention over the cached keys)."""
  t = cfg.text
  d, q, kv = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
  proj = 2 * d * (2 * q + 2 * kv) + 2 * 3 * d * t.intermediate_size
  tables = _layer_tables(cfg, row)
  total = 2 * d * t.vocab_size
  for l in range(cfg.num_layers):
    keys = n_text + (n_vis if row[l] else 0)
    total += proj + 4 * q * keys
    if tables["is_ca"][l]:
      total += 2 * d * (2 * q) + 4 * q * n_vis  # CA q/o projections + attention (K/V cached)
  return total


def main(_):
  cfg = reduced_config()
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
  gen = Generator(model)
  h, w = map(int, FLAGS.image.split("x"))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  ids = list(rng.integers(0, 1000, FLAGS.text)) + [cfg.image_token_id] + [11, 12]
  sample = inputs.build_sample(ids, [image], cfg)
  batch = inputs.collate([sample])
  n_vis, n_text, n_crops = sample.num_visual_tokens, len(sample.tokens), len(sample.pixels)
  rows = {"all SA (LLaVA-OV)": budgets.all_sa(cfg)}
  for k in (0, 2, 4):
    rows[f"{k} SA"] = budgets.mask(cfg, budgets.spread_layers(cfg.visor.sa_candidates, k))
  print(f"reduced LLaVA-OV 0.5B: {cfg.num_layers} LLM layers (CA {list(cfg.visor.ca_layers)}),"
        f" {cfg.vision.num_layers} SigLIP layers; {n_vis} visual + {n_text} text tokens, "
        f"{n_crops} crops; {jax.devices()[0].device_kind} ({cpu_model()}), f32")
  results = {}
  for name, row in rows.items():
    t0 = time.perf_counter()
    gen.generate(batch, budget=row, max_new_tokens=2)  # compile prefill and decode
    first_s = time.perf_counter() - t0
    prefill_s, decode_s = [], []
    for _ in range(FLAGS.repeats):  # the fastest of a few runs: least disturbed by the machine
      t0 = time.perf_counter()
      out = gen.generate(batch, budget=row, max_new_tokens=1)
      prefill_s.append(time.perf_counter() - t0)
      full = gen.generate(batch, budget=row, max_new_tokens=FLAGS.new_tokens)
      decode_s.append(full.decode_seconds[0] / full.decode_steps[0])  # the decode loop alone
    prefill_s, decode_s = min(prefill_s), min(decode_s)
    layers = np.flatnonzero(row[0]).tolist()
    f = flops.forward_flops(cfg, num_crops=n_crops, num_visual=n_vis, num_text=n_text,
                            sa_layers=layers)
    results[name] = dict(first=first_s, prefill=prefill_s, decode=decode_s,
                         kv=int(out.cache_bytes[0]),
                         llm=f["llm"], total=f["total"],
                         dec=decode_flops(cfg, row[0], n_text + FLAGS.new_tokens // 2, n_vis))
  base = results["all SA (LLaVA-OV)"]
  print(f"{'budget':<18} {'prefill s':>9} {'speed-up':>8} {'FLOPs x':>8} {'decode ms':>9} "
        f"{'speed-up':>8} {'FLOPs x':>8} {'KV MiB':>7} {'KV x':>6} {'1st call s':>10}")
  for name, r in results.items():
    print(f"{name:<18} {r['prefill']:9.2f} {base['prefill'] / r['prefill']:8.2f} "
          f"{base['total'] / r['total']:8.2f} {1e3 * r['decode']:9.1f} "
          f"{base['decode'] / r['decode']:8.2f} {base['dec'] / r['dec']:8.2f} "
          f"{r['kv'] / 2**20:7.1f} {base['kv'] / r['kv']:6.2f} {r['first']:10.1f}")
  print("prefill FLOPs x: total (vision + LLM) ratio; decode FLOPs x: analytic per-token ratio;"
        " 1st call: compiling prefill and decode (layers unrolled) plus one run")

  bandwidth = decode_floor.read_bandwidth()
  state = nnx.state(model)
  print(f"\ndecode vs its bandwidth floor (weights read + the whole KV cache, at "
        f"{bandwidth / 1e9:.1f} GB/s measured read bandwidth)")
  print(f"{'budget':<18} {'decode ms':>9} {'MB read':>8} {'floor ms':>8} {'x floor':>7}")
  for (name, r), row in zip(results.items(), rows.values()):
    nbytes = decode_floor.decode_weight_bytes(state, row[0], cfg) + r["kv"]
    floor = nbytes / bandwidth
    print(f"{name:<18} {1e3 * r['decode']:9.1f} {nbytes / 1e6:8.0f} {1e3 * floor:8.1f} "
          f"{r['decode'] / floor:7.2f}")
  if FLAGS.transformers:
    theirs = decode_floor.transformers_ms_per_token(cfg, sample, ids, image, FLAGS.new_tokens,
                                                    FLAGS.repeats)
    ours = 1e3 * base["decode"]
    print(f"\nall SA decode: ours {ours:.1f} ms/token, transformers generate (KV cache, sdpa, "
          f"f32) {theirs:.1f} ms/token: ratio {ours / theirs:.2f}")


if __name__ == "__main__":
  app.run(main)
