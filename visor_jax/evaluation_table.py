"""The trainer's eval: answer accuracy per question family and per budget, next to FLOPs.

Accuracy is teacher-forced answer exact match (`steps.make_eval_step`): a sample counts as
correct when greedy decoding would reproduce its whole reference answer. FLOPs are the
analytic per-sample counts of `flops.py` at each sample's real (unpadded) token counts.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from visor_jax import budgets as budgets_lib
from visor_jax import flops
from visor_jax.config_lib import ModelConfig

FAMILIES = {0: "easy", 1: "hard"}


def sample_flops(cfg: ModelConfig, batch: dict, sa_layers: Sequence[int]) -> np.ndarray:
  """float64[B, 2]: (LLM, total) FLOPs of each sample at its real sizes."""
  crops = np.any(batch["pixels"] != 0, axis=(2, 3, 4)).sum(-1)
  visual = batch["vis_valid"].sum(-1)
  text = batch["text_valid"].sum(-1)
  out = np.zeros((len(crops), 2))
  for i, (p, n, t) in enumerate(zip(crops, visual, text)):
    f = flops.forward_flops(cfg, num_crops=int(p), num_visual=int(n), num_text=int(t),
                            sa_layers=sa_layers)
    out[i] = f["llm"], f["total"]
  return out


def evaluate_budgets(eval_step: Callable, params, batches: Sequence[dict],
                     layer_sets: Sequence[Sequence[int]], cfg: ModelConfig, mesh) -> dict:
  """{budget label: {'sa_layers', 'acc', 'acc_easy', 'acc_hard', 'n', 'llm_gflops',
  'total_gflops', 'loss'}} over the given eval batches."""
  from visor_jax import train_data
  results = {}
  for layers in layer_sets:
    label = budgets_lib.describe(budgets_lib.from_layers(cfg, layers)[0])
    correct, family, fl, losses = [], [], [], []
    for batch in batches:
      b = batch["tokens"].shape[0]
      out = jax.device_get(eval_step(params, train_data.to_global(batch, mesh),
                                     budgets_lib.from_layers(cfg, layers, b)))
      keep = np.asarray(out["has_target"])
      correct.append(np.asarray(out["correct"])[keep])
      family.append(np.asarray(batch["family"])[keep])
      fl.append(sample_flops(cfg, batch, layers)[keep])
      losses.append(float(out["loss"]))
    correct, family, fl = map(np.concatenate, (correct, family, fl))
    r = {"sa_layers": list(layers), "n": int(len(correct)),
         "acc": float(correct.mean()) if len(correct) else float("nan"),
         "llm_gflops": float(fl[:, 0].mean() / 1e9) if len(fl) else 0.0,
         "total_gflops": float(fl[:, 1].mean() / 1e9) if len(fl) else 0.0,
         "loss": float(np.mean(losses)) if losses else float("nan")}
    for code, name in FAMILIES.items():
      sel = family == code
      r[f"acc_{name}"] = float(correct[sel].mean()) if sel.any() else float("nan")
    results[label] = r
  return results


def format_table(results: dict) -> str:
  head = (f"{'budget':<22} {'acc':>6} {'easy':>6} {'hard':>6} {'n':>5} "
          f"{'LLM GFLOPs':>11} {'total GFLOPs':>13}")
  lines = ["eval (teacher-forced answer exact match, per-sample FLOPs)", head, "-" * len(head)]
  for label, r in results.items():
    lines.append(f"{label:<22} {r['acc']:6.3f} {r['acc_easy']:6.3f} {r['acc_hard']:6.3f} "
                 f"{r['n']:5d} {r['llm_gflops']:11.3f} {r['total_gflops']:13.3f}")
  return "\n".join(lines)
