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

from model_fixtures import tiny_models_and_samples
from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import inputs as inputs_lib
from visor_jax.models import splash_attention as spl
from visor_jax.models.nn import Mask, attention

ATOL = 1e-5


def _qkv(b, t, s, n, k, h, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))


def _shuffled_positions(lengths, total, seed=0):
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


def _assert_valid_rows_equal(q, k, v, mask, rows):
  """splash vs xla on the rows (bool[B, T]) a caller reads: outputs, and gradients of a
  random-weighted sum of those rows w.r.t. q, k, v."""
  w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  w = w * rows[:, :, None, None]
  out = {impl: attention(q, k, v, mask, implementation=impl) for impl in ("splash", "xla")}
  sel = np.asarray(rows)
  np.testing.assert_allclose(np.asarray(out["splash"])[sel], np.asarray(out["xla"])[sel],
                             atol=ATOL, rtol=0)
  grads = {impl: jax.grad(lambda *a: jnp.sum(attention(*a, mask, implementation=impl) * w),
                          argnums=(0, 1, 2))(q, k, v) for impl in ("splash", "xla")}
  for a, b in zip(grads["splash"], grads["xla"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0)


def test_causal_self_attention_out_of_position_order_with_padding():
  """Grouped-query heads (4 query heads on 2 kv heads), two samples with different padding,
  positions shuffled in array order: sorted by position inside, unsorted after."""
  pos, valid = _shuffled_positions((150, 97), 160)
  q, k, v = _qkv(2, 160, 160, 4, 2, 16)
  mask = Mask(valid, pos, pos, causal=True)
  assert spl.use_splash(mask)
  _assert_valid_rows_equal(q, k, v, mask, valid)


def test_unmasked_attention_padded_to_a_block():
  """SigLIP's case: no mask, 100 patches padded to 128 inside (the padding is its own segment,
  so real queries never see it)."""
  q, k, v = _qkv(2, 100, 100, 3, 3, 8, seed=1)
  _assert_valid_rows_equal(q, k, v, None, jnp.ones((2, 100), bool))


def test_cross_attention_falls_back_to_blockwise():
  """Text queries over visual keys at other positions: no static splash mask says that, so
  'splash' routes it to the blockwise kernel, still exact."""
  rng = np.random.default_rng(3)
  v_pos = jnp.asarray(np.sort(rng.choice(200, size=(2, 40)), axis=1), jnp.int32)
  t_pos = jnp.asarray(np.sort(rng.choice(200, size=(2, 12)), axis=1), jnp.int32)
  v_valid = jnp.asarray(np.arange(40)[None] < np.array([[40], [31]]))
  mask = Mask(v_valid, t_pos, v_pos, causal=True)
  assert not spl.use_splash(mask)
  q, k, v = _qkv(2, 12, 40, 4, 2, 8, seed=2)
  sees_a_key = mask.has_key()  # rows with no visible key: callers zero them
  _assert_valid_rows_equal(q, k, v, mask, sees_a_key)


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
