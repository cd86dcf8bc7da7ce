"""Reference ('xla') vs blockwise attention: time per call and peak temporary memory.

Why this exists: `jax.nn.dot_product_attention(implementation='xla')` writes the whole float32
[B, N, T, S] probability matrix (and, for the backward pass, keeps it), so attention memory
grows as T² per layer; `models/blockwise_attention.py` never holds more than one block pair.
This measures both on this machine at the model's shapes, through `nn.attention` exactly as the
layers call it (the reference builds its dense mask from the same `nn.Mask`):

  LLM SA     causal self-attention over [visual; text] as VISOR's SA path orders it: 3 prompt
             tokens at positions 0-2 stored *after* the visual tokens (3 .. 3+N-1), then the
             rest of the text. 14 query / 2 kv heads, head_dim 64 (Qwen2-0.5B).
  CA         64 text queries over the visual keys (strictly earlier positions), same heads.
  SigLIP     one crop's 729 patches, bidirectional, 16 heads, head_dim 72.

Columns: ms per call (median of --repeats undisturbed runs after a warm-up, interleaved; see
`forward_speed.interleaved_medians`), peak temporary bytes of the compiled program
(`jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`: everything XLA
allocates besides arguments and outputs), for the forward and for forward+backward (gradient
of a weighted sum w.r.t. q, k, v), and the largest |difference| from the reference relative
to the reference's largest |value| (per output, then the max over dq, dk, dv).

Run: python -m visor_jax.benchmarks.attention_speed [--attn_visual=1485,4032] [--repeats=3]
     [--q_block=128] [--k_block=128] [--full_block=1024] [--skip_backward]
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from visor_jax.benchmarks import cpu_model
from visor_jax.benchmarks.forward_speed import FLAGS, interleaved_medians
from visor_jax.models import blockwise_attention as bw
from visor_jax.models.nn import Mask, attention

flags.DEFINE_list("attn_visual", ["1485", "4032"], "Visual token counts of the LLM cases "
                  "(+64 text tokens: T = 1549 and 4096 by default).")
flags.DEFINE_integer("q_block", bw.Q_BLOCK, "Blockwise query block size.")
flags.DEFINE_integer("k_block", bw.K_BLOCK, "Blockwise key block size.")
flags.DEFINE_integer("full_block", bw.FULL_BLOCK, "Blockwise block size without causality.")
flags.DEFINE_bool("skip_backward", False, "Time the forward only.")

TEXT = 64
PROMPT_PREFIX = 3


def llm_case(n_vis: int, rng: np.random.Generator):
  """SA over [visual; text]: q, k, v and the causal Mask with VISOR's position layout."""
  t = n_vis + TEXT
  text_pos = np.r_[np.arange(PROMPT_PREFIX), PROMPT_PREFIX + n_vis + np.arange(TEXT - PROMPT_PREFIX)]
  pos = np.r_[PROMPT_PREFIX + np.arange(n_vis), text_pos][None].astype(np.int32)
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, n, 64)), jnp.float32) for n in (14, 2, 2))
  mask = Mask(jnp.ones((1, t), bool), jnp.asarray(pos), jnp.asarray(pos), causal=True)
  return (q, k, v), mask


def ca_case(n_vis: int, rng: np.random.Generator):
  """CA: the 64 text queries read the visual keys placed strictly before them."""
  text_pos = np.r_[np.arange(PROMPT_PREFIX), PROMPT_PREFIX + n_vis + np.arange(TEXT - PROMPT_PREFIX)]
  vis_pos = PROMPT_PREFIX + np.arange(n_vis)
  q = jnp.asarray(rng.normal(size=(1, TEXT, 14, 64)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, n_vis, 2, 64)), jnp.float32) for _ in range(2))
  mask = Mask(jnp.ones((1, n_vis), bool), jnp.asarray(text_pos[None] - 1),
              jnp.asarray(vis_pos[None]), causal=True)
  return (q, k, v), mask


def siglip_case(rng: np.random.Generator):
  q, k, v = (jnp.asarray(rng.normal(size=(1, 729, 16, 72)), jnp.float32) for _ in range(3))
  return (q, k, v), None


def programs(qkv, mask, impl: str) -> dict[str, Callable]:
  """Jitted forward and forward+backward of `nn.attention` with the mask closed over."""
  def fwd(q, k, v):
    return attention(q, k, v, mask, implementation=impl)

  w = jnp.asarray(np.random.default_rng(1).normal(size=qkv[0].shape), jnp.float32)

  def loss(q, k, v):
    return jnp.sum(fwd(q, k, v) * w)

  return {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}


def temp_bytes(fn, args) -> int:
  analysis = fn.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f}" if n >= 0 else "n/a"


def run_case(name: str, qkv, mask, kinds: Sequence[str]) -> list[str]:
  ref, blk = programs(qkv, mask, "xla"), programs(qkv, mask, "blockwise")
  rows = []
  for kind in kinds:
    fns = {"xla": lambda f=ref[kind]: f(*qkv), "blockwise": lambda f=blk[kind]: f(*qkv)}
    timing = interleaved_medians(fns, FLAGS.repeats)
    mem = {impl: temp_bytes(p[kind], qkv) for impl, p in (("xla", ref), ("blockwise", blk))}
    # Largest |difference| relative to the reference's largest |value|, over out or dq, dk, dv.
    diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(
        jax.tree.leaves(ref[kind](*qkv)), jax.tree.leaves(blk[kind](*qkv))))
    t_ref, t_blk = timing["xla"], timing["blockwise"]
    star = lambda t: "" if t.clean >= FLAGS.repeats else "*"
    rows.append(f"{name:<22} {kind:<8} {t_ref.seconds * 1e3:>8.1f}{star(t_ref):1} "
                f"{t_blk.seconds * 1e3:>8.1f}{star(t_blk):1} "
                f"{t_ref.seconds / t_blk.seconds:>6.2f}x {_mb(mem['xla']):>9} "
                f"{_mb(mem['blockwise']):>9} {diff:>8.1e}")
    print(rows[-1], flush=True)
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  start = time.perf_counter()
  bw.Q_BLOCK, bw.K_BLOCK, bw.FULL_BLOCK = FLAGS.q_block, FLAGS.k_block, FLAGS.full_block
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; CPU: {cpu_model()}, "
        f"{os.cpu_count()} cores; load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
  print(f"float32, batch 1; blockwise blocks q {FLAGS.q_block} x k {FLAGS.k_block} (causal; "
        f"{bw.FULL_BLOCK} otherwise); median of "
        f"{FLAGS.repeats} runs ('*': over disturbed runs); temp = peak temporary MiB.")
  header = (f"{'case':<22} {'pass':<8} {'xla ms':>9} {'blk ms':>9} {'speedup':>7} "
            f"{'xla temp':>9} {'blk temp':>9} {'rel diff':>8}")
  print(header + "\n" + "-" * len(header))
  kinds = ["fwd"] + ([] if FLAGS.skip_backward else ["fwd+bwd"])
  rng = np.random.default_rng(0)
  for n_vis in (int(x) for x in FLAGS.attn_visual):
    run_case(f"LLM SA T={n_vis + TEXT}", *llm_case(n_vis, rng), kinds)
    run_case(f"CA 64 x {n_vis}", *ca_case(n_vis, rng), kinds)
  run_case("SigLIP 729, 16x72", *siglip_case(rng), kinds)
  print(f"Heads: LLM/CA 14 query, 2 kv, head_dim 64. Wall time "
        f"{time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
  app.run(main)
