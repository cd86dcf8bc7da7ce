"""`attention_impl='splash'` (models/splash_attention.py): JAX's Pallas TPU splash kernel, run
here in Pallas interpret mode, equals the 'xla' reference on every valid row (forward and
gradients), for causal self-attention with tokens out of position order, unmasked SigLIP
attention, and — through its blockwise fallback — cross-attention; and a whole model with it
equals the reference's logits and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_fixtures import (assert_valid_rows_equal, cross_attention_case, self_attention_case,
                            tiny_models_and_samples, unmasked_case)
from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import inputs as inputs_lib
from visor_jax.models import splash_attention as spl

ATOL = 1e-5


def test_causal_self_attention_out_of_position_order_with_padding():
  """Grouped-query heads (4 query heads on 2 kv heads), two samples with different padding,
  positions shuffled in array order: sorted by position inside, unsorted after."""
  case = self_attention_case()
  assert spl.use_splash(case[3])
  assert_valid_rows_equal("splash", *case)


def test_unmasked_attention_padded_to_a_block():
  """SigLIP's case: no mask, 100 patches padded to 128 inside (the padding is its own segment,
  so real queries never see it)."""
  assert_valid_rows_equal("splash", *unmasked_case())


def test_cross_attention_falls_back_to_blockwise():
  """Text queries over visual keys at other positions: no static splash mask says that, so
  'splash' routes it to the blockwise kernel, still exact."""
  case = cross_attention_case()
  assert not spl.use_splash(case[3])
  assert_valid_rows_equal("splash", *case)


def test_block_sizes_divide_the_padded_length():
  for length, block in ((128, 128), (256, 256), (384, 128), (512, 512), (1536, 512)):
    assert spl._block(length) == block


def test_splash_is_a_valid_config_choice():
  m = model_configs.tiny()
  m.attention_impl = "splash"
  assert config_lib.model_config(m).attention_impl == "splash"


@pytest.fixture(scope="module")
def tiny_pair():
  """The tiny model twice, same weights: reference attention and splash."""
  cfg, models, samples = tiny_models_and_samples(("xla", "splash"))
  return cfg, models, inputs_lib.collate(samples)


def test_tiny_model_logits_and_gradients_equal_reference(tiny_pair):
  """Mixed per-sample budget (all SA, CA only, SA on {1, 4}): SigLIP and the LLM's text and SA
  paths run the splash kernel, CA the fallback; logits on valid text tokens and every
  parameter gradient of a loss over them equal the reference."""
  cfg, models, batch = tiny_pair
  budget = np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg), budgets.mask(cfg, [1, 4])])
  valid = np.asarray(batch["text_valid"])
  w = np.random.default_rng(0).normal(size=(3, valid.shape[1], cfg.text.vocab_size))
  w = jnp.asarray(w * valid[:, :, None], jnp.float32)
  out = {}
  for impl, model in models.items():
    graphdef, state = nnx.split(model)
    fwd = lambda st: nnx.merge(graphdef, st)(batch, budget)  # noqa: E731
    logits = jax.jit(fwd)(state)
    grads = jax.jit(jax.grad(lambda st: jnp.sum(fwd(st) * w)))(state)
    out[impl] = (np.asarray(logits)[valid], jax.tree.leaves(grads))
  np.testing.assert_allclose(out["splash"][0], out["xla"][0], atol=ATOL, rtol=0)
  for a, b in zip(out["splash"][1], out["xla"][1]):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, atol=ATOL * np.abs(b).max() + 1e-6, rtol=0)
