"""The exported PyTorch VISOR model's greedy generation: KV cache vs re-running the decoder.

    python -m visor_jax.benchmarks.torch_generate_speed [--layers=8] [--vision_layers=4]
        [--image=384x384] [--text=64] [--new_tokens=16]

The same reduced LLaVA-OV 0.5B as `generate_speed` (its widths, fewer layers; random weights,
VISOR's new parts random too), built directly as `torch_model.VisorForConditionalGeneration`
(what `from_pretrained` returns for an export). Per budget: milliseconds per generated token
after the first (prefill excluded: the mean over the remaining tokens), with the cache
(`torch_decode.py`, the default) and without (each token re-runs the decoder over the whole
prompt), their ratio, and whether both produced the same tokens. Target (issue 12): >= 5x.
"""
import time

import numpy as np
import torch
from absl import app, flags

from visor_jax import budgets
from visor_jax.benchmarks import cpu_model, generate_speed
from visor_jax.convert import tiny_checkpoint, torch_export
from visor_jax.convert.torch_model import VisorForConditionalGeneration, VisorLayout
from visor_jax.data import inputs

FLAGS = flags.FLAGS
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default).")


def torch_model(cfg, model_dict) -> VisorForConditionalGeneration:
  llava = tiny_checkpoint.build_hf_model(model_dict)
  llava.config.text_config._attn_implementation = "sdpa"
  model = VisorForConditionalGeneration(llava, VisorLayout.from_json(
      torch_export.visor_layout(cfg))).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.visor.parameters():
      p.copy_(0.02 * torch.randn(p.shape, generator=g))
  return model


def per_token_ms(model, batch, row, use_cache: bool) -> tuple[float, np.ndarray]:
  """(ms per token after the first, tokens): the fastest of `--repeats` runs."""
  best, tokens = float("inf"), None
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    model.generate(batch, 1, budget=row, use_cache=use_cache)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = model.generate(batch, FLAGS.new_tokens, budget=row, use_cache=use_cache).numpy()
    best = min(best, (time.perf_counter() - t0 - first) / (FLAGS.new_tokens - 1))
  return 1e3 * best, tokens


def main(_):
  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  cfg = generate_speed.reduced_config()
  model_dict = generate_speed.reduced_model_dict()
  model = torch_model(cfg, model_dict)
  h, w = map(int, FLAGS.image.split("x"))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  ids = list(rng.integers(0, 1000, FLAGS.text)) + [cfg.image_token_id] + [11, 12]
  sample = inputs.build_sample(ids, [image], cfg)
  batch = inputs.collate([sample])
  rows = {"all SA (LLaVA-OV)": budgets.all_sa(cfg)}
  for k in (0, 2):
    rows[f"{k} SA"] = budgets.mask(cfg, budgets.spread_layers(cfg.visor.sa_candidates, k))
  print(f"PyTorch export, reduced LLaVA-OV 0.5B: {cfg.num_layers} LLM layers, "
        f"{cfg.vision.num_layers} SigLIP layers; {sample.num_visual_tokens} visual + "
        f"{len(sample.tokens)} text tokens; {FLAGS.new_tokens} new tokens; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, f32; "
        f"{cpu_model()}")
  print(f"{'budget':<18} {'re-run ms/token':>15} {'cached ms/token':>15} {'speed-up':>8} "
        f"{'same tokens':>11}")
  for name, row in rows.items():
    rerun, a = per_token_ms(model, batch, row, use_cache=False)
    cached, b = per_token_ms(model, batch, row, use_cache=True)
    print(f"{name:<18} {rerun:15.1f} {cached:15.1f} {rerun / cached:8.1f} "
          f"{str(bool(np.array_equal(a, b))):>11}")
  print("target: cached >= 5x faster per token than re-running the decoder, same tokens")


if __name__ == "__main__":
  app.run(main)
