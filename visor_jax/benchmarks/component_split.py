"""Where does the forward's time go, ours against transformers, part by part?

`forward_speed` compares whole forwards; this splits one into the parts a kernel change would
touch, times each part alone in both frameworks on the same shapes, and multiplies by how often
the all-SA forward (LLaVA-OV itself) runs it:

  tower       SigLIP over the crops (every layer, as LLaVA-OV calls it)      x 1
  projector   the 2-layer MLP from SigLIP width to the LLM's                 x 1
  attention   one LLM layer's attention block over [visual; text] (norm, q/k/v with RoPE,
              causal attention, output projection)                            x layers
  mlp         one LLM layer's SwiGLU MLP block (norm, MLP) on every token     x layers
  head        the LM head on the text tokens                                 x 1

Same geometry and flags as `forward_speed` (LLaVA-OV 0.5B widths, `--layers` LLM and
`--vision_layers` SigLIP layers, a 384x384 image: 1,485 visual + 65 text tokens, batch 1,
float32, random weights). Timings: median of `--repeats` undisturbed runs after a warm-up,
every part of both frameworks interleaved in one group. About 2 minutes on 2 cores.

Run: python -m visor_jax.benchmarks.component_split [--attention_impl=blockwise|xla]
     [--layers=6] [--vision_layers=4] [--repeats=3]
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from visor_jax.benchmarks import cpu_model, transformers_ref
from visor_jax.benchmarks.forward_speed import flagged_model_and_input, interleaved_medians
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax.models.nn import Mask, attention

FLAGS = flags.FLAGS
# Flags: forward_speed's (--layers, --vision_layers, --image_size, --text_len, --repeats,
# --attention_impl), which this module imports.

PARTS = ("tower", "projector", "attention", "mlp", "head")


def our_parts(model: LlavaOnevision, pixels: np.ndarray, n_tokens: int, n_text: int
              ) -> dict[str, Callable[[], Any]]:
  """Jitted closures, one per part, on random activations of the forward's shapes."""
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  d = cfg.text.hidden_size
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, n_tokens, d)), jnp.float32)
  pos = jnp.arange(n_tokens, dtype=jnp.int32)[None]
  mask = Mask(jnp.ones((1, n_tokens), bool), pos, pos, causal=True)
  px = jnp.asarray(pixels)
  feats = jax.jit(lambda st: nnx.merge(graphdef, st).vision(px, cfg.feature_layers))(state)

  def layer0(m):
    layer_def, layer_state = nnx.split(m.decoder.layers)
    return nnx.merge(layer_def, jax.tree.map(lambda a: a[0], layer_state))

  def attn(m):
    layer = layer0(m)
    h = layer.input_norm(x)
    k, v = layer.attn.project_kv(h, pos)
    a = attention(layer.attn.project_q(h, pos), k, v, mask, implementation=cfg.attention_impl)
    return x + layer.attn.output(a)

  def mlp(m):
    layer = layer0(m)
    return x + layer.mlp(layer.post_attn_norm(x))

  fns = {
      "tower": lambda m: m.vision(px, cfg.feature_layers),
      "projector": lambda m: m.projector_2(jax.nn.gelu(m.projector_1(feats), approximate=False)),
      "attention": attn,
      "mlp": mlp,
      "head": lambda m: m.logits(x[:, -n_text:]),
  }
  jitted = {k: jax.jit(lambda st, f=f: f(nnx.merge(graphdef, st))) for k, f in fns.items()}
  return {k: (lambda f=f: f(state)) for k, f in jitted.items()}


def torch_parts(model_cfg: Any, sample, token_ids: Sequence[int], image: np.ndarray,
                n_tokens: int, n_text: int) -> dict[str, Callable[[], Any]]:
  """The same parts of transformers' LLaVA-OV (sdpa, float32), called as its forward calls
  them: the tower with every hidden state, the attention with a causal mask (no mask tensor:
  sdpa's is_causal)."""
  import torch

  model, _, pixels = transformers_ref.model_and_inputs(model_cfg, sample, token_ids, image)
  inner = model.model
  lm = inner.language_model
  layer = lm.layers[0]
  x = torch.from_numpy(np.random.default_rng(0).standard_normal(
      (1, n_tokens, model_cfg.text.hidden_size)).astype(np.float32))
  pos_ids = torch.arange(n_tokens)[None]
  px = pixels[0]
  with torch.inference_mode():
    feats = inner.vision_tower(px, output_hidden_states=True).hidden_states[-1]

  def run(fn):
    def timed():
      with torch.inference_mode():
        return fn()
    return timed

  def attn():
    pe = lm.rotary_emb(x, pos_ids)
    return x + layer.self_attn(layer.input_layernorm(x), pe, None)[0]

  return {
      "tower": run(lambda: inner.vision_tower(px, output_hidden_states=True).hidden_states[-1]),
      "projector": run(lambda: inner.multi_modal_projector(feats)),
      "attention": run(attn),
      "mlp": run(lambda: x + layer.mlp(layer.post_attention_layernorm(x))),
      "head": run(lambda: model.lm_head(x[:, -n_text:])),
  }


def main(argv: Sequence[str]) -> None:
  del argv
  t0 = time.perf_counter()
  model_cfg, cfg, (_, sample, token_ids, image) = flagged_model_and_input()
  n_vis, n_text = sample.num_visual_tokens, len(sample.tokens)
  n_tokens = n_vis + n_text
  print(f"{cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}; float32, batch 1, "
        f"attention_impl={FLAGS.attention_impl!r}")
  print(f"LLaVA-OV 0.5B widths, {cfg.num_layers} LLM / {cfg.vision.num_layers} SigLIP layers; "
        f"{len(sample.pixels)} crops, {n_vis} visual + {n_text} text tokens.")
  ours = our_parts(LlavaOnevision(cfg, rngs=nnx.Rngs(0)), sample.pixels, n_tokens, n_text)
  theirs = torch_parts(model_cfg, sample, token_ids, image, n_tokens, n_text)
  fns = {**{f"ours/{k}": f for k, f in ours.items()},
         **{f"torch/{k}": f for k, f in theirs.items()}}
  t = interleaved_medians(fns, FLAGS.repeats)
  times = {"tower": 1, "projector": 1, "attention": cfg.num_layers, "mlp": cfg.num_layers,
           "head": 1}
  header = (f"{'part':<10} {'x':>3} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} | "
            f"{'ours total':>10} {'torch total':>11}")
  print("\n" + header + "\n" + "-" * len(header))
  total = {"ours": 0.0, "torch": 0.0}
  for part in PARTS:
    o, p = t[f"ours/{part}"].seconds * 1e3, t[f"torch/{part}"].seconds * 1e3
    k = times[part]
    total["ours"] += o * k
    total["torch"] += p * k
    print(f"{part:<10} {k:>3} {o:>9.1f} {p:>9.1f} {o / p:>6.2f} | {o * k:>10.0f} "
          f"{p * k:>11.0f}")
  print(f"{'sum':<10} {'':>3} {'':>9} {'':>9} {total['ours'] / total['torch']:>6.2f} | "
        f"{total['ours']:>10.0f} {total['torch']:>11.0f}")
  disturbed = sum(x.disturbed for x in t.values())
  print(f"\nratio: ours / torch (< 1: we are faster). total: the part x how often the all-SA "
        f"forward runs it.\n{disturbed} disturbed run(s) re-run. "
        f"Wall {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
  app.run(main)
