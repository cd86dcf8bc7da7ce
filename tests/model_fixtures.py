"""Helpers shared by the model-level tests (forward, generation, export)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def prompt_ids(tok, text: str = "What colour is the small square?") -> list[int]:
  """A ChatML user turn with the image placeholder and `text`, then the assistant header."""
  return (tok.encode("<|im_start|>user\n") + [tok.image_token_id]
          + tok.encode("\n" + text + "<|im_end|>\n<|im_start|>assistant\n"))


def perturb_new_parts(model, seed: int = 1) -> None:
  """Makes CA outputs and the positional conv non-zero (as after training): at their init
  they are exact no-ops, which would let a comparison pass vacuously."""
  rng = np.random.default_rng(seed)
  o_proj = model.decoder.cross.attn.o_proj
  o_proj.kernel[...] = jnp.asarray(rng.normal(0, 0.3, o_proj.kernel.shape), jnp.float32)
  pc = model.decoder.pos_conv
  pc.pointwise[...] = jnp.asarray(rng.normal(0, 0.3, pc.pointwise.shape), jnp.float32)


def xla_check_config():
  """The FLOPs cross-checks' model: matmul-dominated but quick to compile (width 256, head_dim
  64, 400 visual tokens over 3 crops, 32 text tokens) and a one-layer SigLIP tower, because
  XLA's cost analysis counts a scan body once. → (ModelConfig, shape kwargs)."""
  from visor_jax import config_lib, model_configs
  m = model_configs.tiny()
  m.vision.update(dict(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024,
                       num_layers=1, num_heads=4))
  m.text.update(dict(vocab_size=2000, hidden_size=256, intermediate_size=1024, num_layers=6,
                     num_heads=4, num_kv_heads=2, head_dim=64))
  m.image_grid_pinpoints = model_configs.pinpoints(224, 3)
  return config_lib.model_config(m), dict(num_crops=3, num_visual=400, num_text=32)


def tiny_models_and_samples(impls: tuple[str, ...]):
  """The tiny model once per attention implementation, same weights (CA and pos-conv
  perturbed so they matter), and three samples of different shapes → (cfg, {impl: model},
  samples)."""
  import hf_fixtures
  from flax import nnx
  from visor_jax import config_lib, model_configs
  from visor_jax.data import inputs as inputs_lib
  from visor_jax.models.llava_onevision import LlavaOnevision
  tok = hf_fixtures.tiny_tokenizer()
  models = {}
  for impl in impls:
    m = model_configs.tiny()
    m.attention_impl = impl
    models[impl] = LlavaOnevision(config_lib.model_config(m), rngs=nnx.Rngs(4))
    perturb_new_parts(models[impl])
  cfg = models[impls[0]].cfg
  samples = [inputs_lib.build_sample(prompt_ids(tok, p), [hf_fixtures.random_image(*hw, seed=i)],
                                     cfg)
             for i, (p, hw) in enumerate([("What colour?", (40, 70)), ("Read the code.", (84, 84)),
                                          ("How many shapes?", (20, 60))])]
  return cfg, models, samples
