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
