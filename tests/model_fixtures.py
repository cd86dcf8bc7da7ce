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


def random_qkv(b, t, s, n, k, h, seed=0):
  """Random float32 q [B, T, N, H] and k, v [B, S, K, H] (attention tests)."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))


def shuffled_positions(lengths, total, seed=0):
  """Per sample: `length` valid tokens at distinct positions in a random array order (as
  VISOR's [visual; text] SA stream, whose order is not position order), then padding at
  position 0. → (pos int32[B, total], valid bool[B, total])."""
  rng = np.random.default_rng(seed)
  pos, valid = [], []
  for n in lengths:
    p = rng.permutation(rng.choice(3 * total, size=n, replace=False))
    pos.append(np.r_[p, np.zeros(total - n)])
    valid.append(np.arange(total) < n)
  return jnp.asarray(np.stack(pos), jnp.int32), jnp.asarray(np.stack(valid))


def assert_valid_rows_equal(impl: str, q, k, v, mask, rows, atol: float = 1e-5):
  """`impl` vs the 'xla' reference on the rows (bool[B, T]) a caller reads: outputs, and
  gradients of a random-weighted sum of those rows w.r.t. q, k, v."""
  import jax
  from visor_jax.models.nn import attention
  w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  w = w * rows[:, :, None, None]
  out = {i: attention(q, k, v, mask, implementation=i) for i in (impl, "xla")}
  sel = np.asarray(rows)
  np.testing.assert_allclose(np.asarray(out[impl])[sel], np.asarray(out["xla"])[sel],
                             atol=atol, rtol=0)
  grads = {i: jax.grad(lambda *a, i=i: jnp.sum(attention(*a, mask, implementation=i) * w),
                       argnums=(0, 1, 2))(q, k, v) for i in (impl, "xla")}
  for a, b in zip(grads[impl], grads["xla"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def self_attention_case():
  """(q, k, v, mask, rows to compare): causal self-attention, 4 query heads on 2 kv heads, two
  samples with different padding, positions shuffled in array order (as the SA stream)."""
  from visor_jax.models.nn import Mask
  pos, valid = shuffled_positions((150, 97), 160)
  return (*random_qkv(2, 160, 160, 4, 2, 16), Mask(valid, pos, pos, causal=True), valid)


def unmasked_case():
  """(q, k, v, None, rows): SigLIP's case, 100 patches, no mask."""
  return (*random_qkv(2, 100, 100, 3, 3, 8, seed=1), None, jnp.ones((2, 100), bool))


def cross_attention_case():
  """(q, k, v, mask, rows): text queries over visual keys at other positions; the rows that
  see a key (callers zero the others)."""
  from visor_jax.models.nn import Mask
  rng = np.random.default_rng(3)
  v_pos = jnp.asarray(np.sort(rng.choice(200, size=(2, 40)), axis=1), jnp.int32)
  t_pos = jnp.asarray(np.sort(rng.choice(200, size=(2, 12)), axis=1), jnp.int32)
  v_valid = jnp.asarray(np.arange(40)[None] < np.array([[40], [31]]))
  mask = Mask(v_valid, t_pos, v_pos, causal=True)
  return (*random_qkv(2, 12, 40, 4, 2, 8, seed=2), mask, mask.has_key())
