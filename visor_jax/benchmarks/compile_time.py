"""Compile time of the jitted forward vs LLM depth (abstract weights: nothing materialised).

    python -m visor_jax.benchmarks.compile_time [--depths=6,12,24] [--visual=3699]

Layers are one `lax.scan` with a `lax.switch` per layer, so compile time should be flat in
depth; a Python-unrolled stack would grow linearly.
"""
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from visor_jax import config_lib, model_configs
from visor_jax.models.llava_onevision import LlavaOnevision, abstract_inputs

FLAGS = flags.FLAGS
flags.DEFINE_list("depths", ["6", "12", "24"], "LLM depths to compile.")
flags.DEFINE_integer("visual", 3699, "Visual tokens (3,699 = one 768x768 image).")
flags.DEFINE_integer("crops", 5, "Crops per sample.")
flags.DEFINE_integer("text", 64, "Text tokens.")


def compile_seconds(depth: int) -> float:
  m = model_configs.llava_ov_0_5b()
  m.text.num_layers = depth
  cfg = config_lib.model_config(m)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0))))
  fwd = jax.jit(lambda st, x, b: nnx.merge(graphdef, st)(x, b))
  args = (state, abstract_inputs(cfg, 1, FLAGS.text, FLAGS.crops, FLAGS.visual),
          jax.ShapeDtypeStruct((1, depth), jnp.bool_))
  start = time.perf_counter()
  fwd.lower(*args).compile()
  return time.perf_counter() - start


def main(_):
  print(f"{'LLM layers':>10} | {'compile s':>9}   (0.5B widths, {FLAGS.visual} visual tokens, "
        f"{jax.devices()[0].platform})")
  for d in map(int, FLAGS.depths):
    print(f"{d:>10} | {compile_seconds(d):9.2f}")


if __name__ == "__main__":
  app.run(main)
