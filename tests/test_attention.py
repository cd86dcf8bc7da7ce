"""Blockwise attention equals the 'xla' reference (forward and gradients) on every mask the
model uses, never holds a [T, S] array, and is selected by `model.attention_impl`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_fixtures import random_qkv as _qkv
from model_fixtures import tiny_models_and_samples
from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import inputs as inputs_lib
from visor_jax.inference.generate import Generator, _layer_tables
from visor_jax.models import blockwise_attention as bw
from visor_jax.models import token_reduction as tr
from visor_jax.models.nn import Mask, attention

ATOL = 1e-5


def _vis_text_streams(n_vis=(29, 41), n_text=(13, 19), prefix=3):
  """[visual; text] as VISOR's SA path stores them, padded like `inputs.collate`: text tokens
  0..prefix-1 come *after* the visual tokens in the array but before them in position, so
  positions are not monotonic in array order. → (pos int32[B, N+T], valid bool[B, N+T])."""
  nv, nt = max(n_vis), max(n_text)
  pos, valid = [], []
  for v, t in zip(n_vis, n_text):
    vis_pos = np.r_[prefix + np.arange(v), np.zeros(nv - v)]           # padding: position 0
    text_pos = np.r_[np.arange(prefix), prefix + v + np.arange(t - prefix)]
    last = text_pos[-1]
    text_pos = np.r_[text_pos, last + 1 + np.arange(nt - t)]           # padding: after the end
    pos.append(np.r_[vis_pos, text_pos])
    valid.append(np.r_[np.arange(nv) < v, np.arange(nt) < t])
  return jnp.asarray(np.stack(pos), jnp.int32), jnp.asarray(np.stack(valid))


def _assert_same(q, k, v, mask, *, blocks=(16, 16), grads=True):
  """Blockwise (small blocks, so many block pairs and skips) vs the reference: outputs and
  gradients of a random-weighted sum w.r.t. q, k, v."""
  ref = lambda q, k, v: attention(q, k, v, mask, implementation="xla")

  def blk(q, k, v):
    if isinstance(mask, Mask):
      return bw.blockwise_attention(q, k, v, q_pos=mask.q_pos, k_pos=mask.k_pos,
                                    k_valid=mask.k_valid, causal=mask.causal,
                                    q_block=blocks[0], k_block=blocks[1])
    return bw.blockwise_attention(q, k, v, mask=mask, q_block=blocks[0], k_block=blocks[1])

  np.testing.assert_allclose(np.asarray(blk(q, k, v)), np.asarray(ref(q, k, v)), atol=ATOL,
                             rtol=0)
  if grads:
    w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grad(blk), grad(ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5 * ATOL, rtol=ATOL,
                                 err_msg=f"d{name}")


def test_causal_sa_over_vis_text_with_interleaved_positions_and_padding():
  pos, valid = _vis_text_streams()
  q, k, v = _qkv(2, pos.shape[1], pos.shape[1], 4, 2, 16)
  _assert_same(q, k, v, Mask(valid, pos, pos, causal=True))


def test_causal_sa_with_keys_in_random_order():
  """Block skipping is decided from positions at run time: any array order is exact."""
  pos, valid = _vis_text_streams()
  perm = np.random.default_rng(3).permutation(pos.shape[1])
  q, k, v = _qkv(2, pos.shape[1], pos.shape[1], 4, 2, 16, seed=1)
  _assert_same(q[:, perm], k[:, perm], v[:, perm],
               Mask(valid[:, perm], pos[:, perm], pos[:, perm], causal=True), blocks=(8, 8))


def test_cross_attention_text_over_visual_keys():
  """CA as `visor.CrossAttention.read` builds it (keys strictly earlier), and plain padding
  (no causality). Text tokens before the image see no key at all."""
  pos, valid = _vis_text_streams()
  vis_pos, vis_valid, text_pos = pos[:, :41], valid[:, :41], pos[:, 41:]
  q, k, v = _qkv(2, text_pos.shape[1], 41, 4, 2, 16, seed=2)
  ca = Mask(vis_valid, text_pos - 1, vis_pos, causal=True)
  dense = ((vis_pos[:, None, None, :] < text_pos[:, None, :, None])
           & vis_valid[:, None, None, :])
  np.testing.assert_array_equal(np.asarray(ca.dense()), np.asarray(dense))
  np.testing.assert_array_equal(np.asarray(ca.has_key()), np.asarray(dense.any(-1)[:, 0]))
  assert not np.asarray(ca.has_key()).all()  # the prompt prefix: fully masked rows
  _assert_same(q, k, v, ca, blocks=(8, 16))
  _assert_same(q, k, v, Mask(vis_valid), blocks=(8, 16))


def test_siglip_bidirectional_no_mask():
  q, k, v = _qkv(3, 49, 49, 4, 4, 72, seed=4)
  _assert_same(q, k, v, None)


@pytest.mark.parametrize("heads", [(8, 1), (6, 2), (4, 4)])
def test_grouped_query_heads(heads):
  n, kh = heads
  q, k, v = _qkv(2, 37, 45, n, kh, 8, seed=5)
  pos = jnp.asarray(np.random.default_rng(5).integers(0, 50, (2, 45)), jnp.int32)
  _assert_same(q, k, v, Mask(jnp.ones((2, 45), bool), pos[:, :37] + 5, pos, causal=True),
               blocks=(8, 16))


def test_dense_mask_per_head():
  """Callers may still pass a dense bool[B, 1|N, T, S] (the reference's old path)."""
  q, k, v = _qkv(2, 37, 45, 4, 2, 8, seed=6)
  rng = np.random.default_rng(6)
  for heads in (1, 4):
    mask = jnp.asarray(rng.random((2, heads, 37, 45)) < 0.3)
    _assert_same(q, k, v, mask, blocks=(8, 16))


def test_fully_masked_rows_match_the_reference():
  """The reference gives a fully masked row the uniform average of all S values (it masks
  with a large finite negative): rows before every key, a whole query block of them (every key
  block skipped), and a sample with no valid key at all."""
  t, s = 20, 27
  q, k, v = _qkv(2, t, s, 4, 2, 8, seed=8)
  q_pos = jnp.asarray(np.stack([np.arange(t), np.arange(t) + 10]), jnp.int32)
  k_pos = jnp.asarray(np.stack([np.arange(s) + 12] * 2), jnp.int32)
  k_valid = jnp.asarray(np.stack([np.ones(s, bool), np.zeros(s, bool)]))
  mask = Mask(k_valid, q_pos, k_pos, causal=True)
  has_key = np.asarray(mask.has_key())
  assert not has_key[0, :12].any() and has_key[0, 12:].all() and not has_key[1].any()
  _assert_same(q, k, v, mask, blocks=(8, 8))
  out = bw.blockwise_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, causal=True,
                               q_block=8, k_block=8)
  mean_v = np.repeat(np.asarray(v).mean(axis=1), 2, axis=1)            # [B, N, H]
  np.testing.assert_allclose(np.asarray(out)[1], np.broadcast_to(mean_v[1], (t, 4, 8)),
                             atol=ATOL)


@pytest.mark.parametrize("shape", [(1, 1, 130), (5, 131, 7), (3, 3, 3), (2, 5, 0)])
def test_odd_lengths(shape):
  b, t, s = shape
  q, k, v = _qkv(b, t, s, 2, 1, 8, seed=9)
  rng = np.random.default_rng(9)
  k_valid = jnp.asarray(rng.random((b, s)) < 0.8)
  _assert_same(q, k, v, Mask(k_valid, jnp.asarray(rng.integers(0, 9, (b, t))),
                             jnp.asarray(rng.integers(0, 9, (b, s))), causal=True),
               blocks=(16, 32))


def test_bfloat16_close_to_reference():
  pos, valid = _vis_text_streams()
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, pos.shape[1], pos.shape[1], 4, 2, 16))
  mask = Mask(valid, pos, pos, causal=True)
  out = attention(q, k, v, mask, implementation="blockwise")
  ref = attention(q, k, v, mask, implementation="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2)


def test_causal_block_skipping():
  """Keys ordered by position: block pairs wholly above the diagonal are skipped."""
  pos = jnp.arange(64, dtype=jnp.int32)[None].reshape(1, 4, 16).transpose(1, 0, 2)
  live = bw._live_blocks(pos, pos, jnp.ones((4, 1, 16), bool), None, causal=True)
  np.testing.assert_array_equal(np.asarray(live), np.tril(np.ones((4, 4), bool)))


def test_no_score_matrix_in_memory():
  """Peak temporaries of the compiled program: the reference holds float32[B, N, T, S] (16 MiB
  here, more for the backward); blockwise holds block pairs."""
  t, n = 1024, 4
  q, k, v = _qkv(1, t, t, n, 2, 16)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  mask = Mask(jnp.ones((1, t), bool), pos, pos, causal=True)
  score_bytes = n * t * t * 4

  def temp(impl, backward):
    f = lambda q, k, v: attention(q, k, v, mask, implementation=impl)
    if backward:
      f = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, implementation=impl)),
                   argnums=(0, 1, 2))
    return jax.jit(f).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  for backward in (False, True):
    assert temp("xla", backward) >= score_bytes
    assert temp("blockwise", backward) < score_bytes / 4, backward


def test_unknown_implementation_is_a_clear_error():
  m = model_configs.tiny()
  m.attention_impl = "flash"
  with pytest.raises(ValueError, match="model.attention_impl='flash'"):
    config_lib.model_config(m)
  q, k, v = _qkv(1, 3, 3, 2, 1, 4)
  with pytest.raises(ValueError, match="model.attention_impl"):
    attention(q, k, v, None, implementation="flash")
  for impl in (None, "xla", "blockwise"):
    m.attention_impl = impl
    assert config_lib.model_config(m).attention_impl == impl


def test_unset_implementation_is_blockwise_on_cpu_without_collectives_in_skips():
  """None means 'blockwise' on CPU (the suite's backend), 'xla' on accelerators. While a
  trainer splits the batch over several CPU devices, blockwise computes every block pair
  (a batch-wide skip decision would be a collective inside a conditional: it deadlocked)."""
  from visor_jax import sharding
  from visor_jax.models import nn
  assert jax.default_backend() == "cpu"
  assert nn.default_implementation() == "blockwise" == nn.check_implementation(None)
  assert not sharding.skips_need_collectives()
  mesh = jax.make_mesh((2, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:2])
  with sharding.activation_mesh(mesh):  # the dry run: plans an accelerator, which skips
    assert not sharding.skips_need_collectives()
  with sharding.activation_mesh(mesh, runs_on_cpu=True):
    assert sharding.skips_need_collectives()
    q, k, v = _qkv(2, 96, 96, 2, 1, 8)
    pos = jnp.tile(jnp.arange(96)[None], (2, 1))
    out = bw.blockwise_attention(q, k, v, q_pos=pos, k_pos=pos, causal=True, q_block=32,
                                 k_block=32)
  ref = attention(q, k, v, nn.Mask(jnp.ones((2, 96), bool), pos, pos, causal=True),
                  implementation="xla")
  np.testing.assert_allclose(out, ref, atol=2e-6)


def test_flops_cross_checks_count_with_xla_attention():
  """XLA's cost analysis counts a loop body once, so blockwise (and splash) attention would hide
  most attention FLOPs: the cross-checks compile with 'xla', whatever the model says."""
  import dataclasses
  from visor_jax import flops
  cfg = config_lib.model_config(model_configs.tiny())
  for impl in (None, "blockwise", "splash"):
    assert flops.counted_attention(dataclasses.replace(cfg, attention_impl=impl)
                                   ).attention_impl == "xla"


@pytest.fixture(scope="module")
def tiny_pair():
  """The tiny model twice, same weights: reference attention, and blockwise (with
  `small_blocks`: 8-token blocks, so the short test sequences span many blocks)."""
  return tiny_models_and_samples(("xla", "blockwise"))


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(bw, "Q_BLOCK", 8)
  monkeypatch.setattr(bw, "K_BLOCK", 8)
  monkeypatch.setattr(bw, "FULL_BLOCK", 8)


def test_tiny_model_logits_blockwise_equal_reference(tiny_pair, small_blocks):
  """Mixed per-sample budget: all SA, CA only, SA on {1, 4} — SA over [V; T], CA, text-only
  layers and the SigLIP tower all go through the selected implementation."""
  cfg, models, samples = tiny_pair
  batch = inputs_lib.collate(samples)
  budget = np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg), budgets.mask(cfg, [1, 4])])
  logits = {impl: np.asarray(nnx.jit(lambda m, x, b: m(x, b))(m, batch, budget))
            for impl, m in models.items()}
  np.testing.assert_allclose(logits["blockwise"], logits["xla"], atol=ATOL, rtol=0)


def test_tiny_model_gradients_blockwise_equal_reference(tiny_pair, small_blocks):
  """Parameter gradients through the layer scan and the per-layer budget switch."""
  cfg, models, samples = tiny_pair
  batch = inputs_lib.collate(samples)
  budget = np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg), budgets.mask(cfg, [1, 4])])
  w = np.random.default_rng(0).normal(size=(3, batch["tokens"].shape[1], cfg.text.vocab_size))

  def grads(model):
    graphdef, state = nnx.split(model)
    loss = lambda st: jnp.sum(nnx.merge(graphdef, st)(batch, budget) * w)
    return jax.tree.leaves(jax.jit(jax.grad(loss))(state))

  for a, b in zip(grads(models["blockwise"]), grads(models["xla"])):
    # Relative to each leaf's scale (float32 sums over vocab x tokens reach ~1e4), with a
    # floor for leaves that are zero up to rounding.
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, atol=ATOL * np.abs(b).max() + 1e-6, rtol=0)


def test_tiny_model_decode_blockwise_equals_reference(tiny_pair, small_blocks):
  """Prefill and two cached decode steps (inference/generate.py) give the same logits."""
  cfg, models, samples = tiny_pair
  x = inputs_lib.collate(samples[:2])
  row = budgets.mask(cfg, [1])[0]
  tables = {k: jnp.asarray(v) for k, v in _layer_tables(cfg, row).items()}
  num_ca = int(_layer_tables(cfg, row)["is_ca"].sum())
  text_len = x["text_valid"].sum(axis=1).astype(np.int32)
  last = np.maximum(x["text_pos"][np.arange(2), text_len - 1],
                    np.max(np.where(x["vis_valid"], x["vis_pos"], -1), axis=1))
  out = {}
  for impl, model in models.items():
    gen = Generator(model)
    vis = gen._visual(gen.state, x)
    logits, cache = gen._prefill(gen.state, x, vis, tables, 1, num_ca, x["tokens"].shape[1] + 2)
    steps = [np.asarray(logits)]
    for i in range(2):
      token = jnp.asarray([5 + i, 9 + i], jnp.int32)
      logits, cache = gen._decode(gen.state, token, jnp.asarray(last + 1 + i, jnp.int32),
                                  jnp.asarray(text_len + i), cache, x["vis_pos"],
                                  x["vis_valid"], tuple(bool(b) for b in row))
      steps.append(np.asarray(logits))
    out[impl] = np.stack(steps)
  np.testing.assert_allclose(out["blockwise"], out["xla"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "visionzip"])
def test_token_reduction_peers_blockwise_equal_reference(tiny_pair, small_blocks, method):
  """The peers' all-SA layers (over the tokens kept so far) pass an implicit mask too."""
  cfg, models, samples = tiny_pair
  batch = inputs_lib.collate(samples)
  out = {impl: tr.jit_forward(m, tr.Reduction(method, 0.5))(nnx.state(m), batch, None, None)
         for impl, m in models.items()}
  np.testing.assert_array_equal(np.asarray(out["blockwise"].kept), np.asarray(out["xla"].kept))
  np.testing.assert_allclose(np.asarray(out["blockwise"].logits), np.asarray(out["xla"].logits),
                             atol=ATOL, rtol=0)
