"""The hop loss (training/hop_loss.py): its token layout is the pages layout, its forward is the
model's own, it is zero exactly when the head predicts the neighbours, samples whose budget runs
no early SA layer neither count nor get a gradient, and its head is never exported."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from visor_jax import budgets, config_lib, model_configs
from visor_jax.convert import torch_export
from visor_jax.data import inputs, pages
from visor_jax.models.llava_onevision import INPUT_KEYS, LlavaOnevision
from visor_jax.training import config as train_config
from visor_jax.training import hop_loss, steps

GRID = 6


def test_neighbour_table_is_the_page_layout():
  cells, neighbours, exists = hop_loss.neighbour_table(GRID)
  for i, (r, c) in enumerate((r, c) for r in range(GRID) for c in range(GRID)):
    assert cells[i] == pages.visual_token(GRID, (r, c))
    assert exists[i].tolist() == [r > 0, c > 0]
    if r > 0:
      assert neighbours[i, 0] == pages.visual_token(GRID, (r - 1, c))
    if c > 0:
      assert neighbours[i, 1] == pages.visual_token(GRID, (r, c - 1))


def test_loss_is_zero_when_the_head_predicts_the_neighbours_and_ignores_unused_samples():
  n, d = 1 + GRID * (GRID + 1), 8
  e = jax.random.normal(jax.random.key(0), (d,))
  embed = jnp.broadcast_to(e, (2, n, d))       # every neighbour has embedding e
  head = jnp.stack([jnp.eye(d), jnp.eye(d)])
  both = jnp.array([True, True])
  cos = lambda out, use: float(hop_loss.hop_cosine(embed, out, head, use, GRID))
  assert cos(3 * embed, both) == pytest.approx(0.0, abs=1e-6)
  assert cos(-embed, both) == pytest.approx(2.0, abs=1e-6)
  # Sample 1 unused: its (opposite) prediction neither counts nor gets a gradient.
  out = jnp.stack([embed[0], -embed[1]])
  use = jnp.array([True, False])
  assert cos(out, use) == pytest.approx(0.0, abs=1e-6)
  assert cos(out, jnp.array([False, False])) == 0.0
  g = jax.grad(lambda o: hop_loss.hop_cosine(embed, o, head, use, GRID))(out + 0.3)
  assert float(jnp.abs(g[1]).max()) == 0.0 and float(jnp.abs(g[0]).max()) > 0
  # An unused sample's hidden states may be exactly zero: the gradient stays finite.
  g = jax.grad(lambda o: hop_loss.hop_cosine(embed, o, head, use, GRID))(
      jnp.stack([embed[0], jnp.zeros_like(embed[1])]))
  assert bool(jnp.all(jnp.isfinite(g)))


def _model(hop_head=True):
  m = model_configs.pages()
  m.visor.hop_head = hop_head
  cfg = config_lib.model_config(m)
  return cfg, LlavaOnevision(cfg, rngs=nnx.Rngs(0))


def _pages_batch(cfg, n=2):
  samples = []
  for i in range(n):
    rec, _ = pages.generate_example(0, "train", i, grid=GRID)
    samples.append(inputs.build_sample([1, cfg.image_token_id, 5, 6, 7],
                                       [Image.open(io.BytesIO(rec["image"]))], cfg))
  return inputs.collate(samples, text_len=8, num_visual=1 + GRID * (GRID + 1),
                        num_crops=1 + GRID * GRID)


def test_forward_is_the_models_and_the_loss_follows_the_budget():
  cfg, model = _model()
  batch = _pages_batch(cfg)
  all_sa = budgets.mask(cfg, list(range(cfg.num_layers)), 1)
  ca_only = budgets.mask(cfg, [], 1)
  budget = jnp.concatenate([all_sa, ca_only])
  logits, hop = hop_loss.forward(model, batch, budget, 2, GRID)
  np.testing.assert_allclose(logits, model({k: batch[k] for k in INPUT_KEYS}, budget),
                             atol=2e-5)
  assert 0.0 < float(hop) < 2.0
  # The CA-only sample's visual tokens never pass an SA layer: alone it gives no loss.
  _, none = hop_loss.forward(model, batch, jnp.concatenate([ca_only, ca_only]), 2, GRID)
  assert float(none) == 0.0
  with pytest.raises(ValueError, match="hop_head=True"):
    hop_loss.forward(_model(False)[1], batch, budget, 2, GRID)


def test_train_loss_adds_the_weighted_hop_loss_and_the_head_learns():
  cfg, model = _model()
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  batch = {**_pages_batch(cfg), "targets": np.full((2, 8), -1, np.int32)}
  batch["targets"][:, 4] = 9
  budget = budgets.mask(cfg, list(range(cfg.num_layers)), 2)
  spec = hop_loss.Spec(weight=0.5, layers=2, grid=GRID)
  loss_fn = steps.make_loss_fn(graphdef, hop=spec)
  (total, (_, _, token, hop)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, {}, batch, budget)
  assert float(total) == pytest.approx(float(token) + 0.5 * float(hop), rel=1e-6)
  assert float(jnp.abs(grads["decoder"]["hop_head"]).max()) > 0
  plain, (_, _, token0, hop0) = steps.make_loss_fn(graphdef)(params, {}, batch, budget)
  assert float(token0) == pytest.approx(float(token), rel=1e-5) and float(hop0) == 0.0


def test_the_head_is_never_exported():
  cfg, model = _model()
  flat = {".".join(map(str, k)): v for k, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "decoder.hop_head" in flat
  names = [t.name for t in torch_export.plan_tensors(flat, cfg, np.float32)]
  assert names and not any("hop" in n for n in names)
  assert "hop_head" not in torch_export.visor_layout(cfg)


def test_spec_is_pages_only_and_never_with_visor_tr():
  c = train_config.pages(GRID)
  assert hop_loss.spec(c) is None                       # weight 0: off
  c.hop_loss.weight = 1.0
  assert hop_loss.spec(c) == hop_loss.Spec(1.0, 2, GRID)
  c.visor_tr_keep = 0.5
  with pytest.raises(ValueError, match="visor_tr_keep"):
    hop_loss.spec(c)
  s = train_config.default("tiny")
  s.hop_loss.weight = 1.0
  with pytest.raises(ValueError, match="pages"):
    hop_loss.spec(s)
