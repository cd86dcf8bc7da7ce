"""VISOR behaviour: budgets are data (one compilation), per-sample budgets, CA and pos-conv effects."""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures
from model_fixtures import perturb_new_parts as _perturb_new_parts
from model_fixtures import prompt_ids as _prompt_ids
from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import inputs as inputs_lib
from visor_jax.models import visor
from visor_jax.models.llava_onevision import LlavaOnevision


def _cfg(**visor):
  m = model_configs.tiny()
  m.visor.update(visor)
  return config_lib.model_config(m)


@pytest.fixture(scope="module")
def setup():
  cfg = _cfg()
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
  tok = hf_fixtures.tiny_tokenizer()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x, b: nnx.merge(graphdef, state)(x, b))
  samples = [
      inputs_lib.build_sample(_prompt_ids(tok), [hf_fixtures.random_image(40, 70, 1)], cfg),
      inputs_lib.build_sample(_prompt_ids(tok, "Read the code."),
                              [hf_fixtures.random_image(84, 84, 2)], cfg),
      inputs_lib.build_sample(_prompt_ids(tok, "How many shapes?"),
                              [hf_fixtures.random_image(20, 60, 3)], cfg),
  ]
  return cfg, model, tok, forward, samples


def _logits(forward, model, batch, budget):
  return np.asarray(forward(nnx.state(model), batch, budget))


def test_ca_only_budget_reads_vision_once_ca_output_is_nonzero(setup):
  cfg, _, tok, forward, samples = setup
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(3))
  other_image = inputs_lib.build_sample(_prompt_ids(tok), [hf_fixtures.random_image(40, 70, 9)],
                                        cfg)
  a, b = inputs_lib.collate([samples[0]]), inputs_lib.collate([other_image])
  ca = budgets.ca_only(cfg)
  # Zero-initialised CA: with no SA layer, text cannot see the image at all.
  np.testing.assert_array_equal(_logits(forward, model, a, ca), _logits(forward, model, b, ca))
  _perturb_new_parts(model)
  diff = np.abs(_logits(forward, model, a, ca) - _logits(forward, model, b, ca)).max()
  assert diff > 1e-2


def test_tanh_gate_starts_closed():
  cfg = _cfg(ca_gate="tanh")
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
  assert float(model.decoder.cross.gate[...][0]) == 0.0
  t = jnp.ones((1, 3, cfg.text.hidden_size))
  v = jnp.ones((1, 5, cfg.text.hidden_size))
  pos_t, pos_v = jnp.array([[10, 11, 12]]), jnp.arange(5)[None]
  graphdef, state = nnx.split(model.decoder.cross)
  layer0 = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))
  assert float(jnp.abs(layer0(t, v, pos_t, pos_v, jnp.ones((1, 5), bool))).max()) == 0.0
  layer0.gate[...] = jnp.asarray(0.5)
  assert float(jnp.abs(layer0(t, v, pos_t, pos_v, jnp.ones((1, 5), bool))).max()) > 0.0


def test_changing_budget_never_recompiles(setup):
  cfg, model, _, _, samples = setup
  graphdef, state = nnx.split(model)
  compiles = []
  forward = jax.jit(lambda state, x, b: nnx.merge(graphdef, state)(x, b))
  batch = inputs_lib.collate(samples[:2])
  rng = np.random.default_rng(0)
  budget_list = [budgets.all_sa(cfg, 2), budgets.ca_only(cfg, 2),
                 budgets.mask(cfg, cfg.visor.sa_candidates[:1], 2)]
  budget_list += [rng.random((2, cfg.num_layers)) < 0.5 for _ in range(5)]
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event) if "backend_compile" in event else None)
  outs = [np.asarray(forward(state, batch, b)) for b in budget_list]
  assert forward._cache_size() == 1
  assert len(compiles) == 1, compiles
  assert not np.allclose(outs[0], outs[1])  # the budgets did change the computation


def test_per_sample_budgets_equal_each_sample_alone(setup):
  cfg, _, _, forward, samples = setup
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(5))
  _perturb_new_parts(model)
  per_sample = np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg),
                               budgets.mask(cfg, [1, 5])])
  together = _logits(forward, model, inputs_lib.collate(samples), per_sample)
  for i, sample in enumerate(samples):
    alone = _logits(forward, model, inputs_lib.collate([sample]), per_sample[i:i + 1])
    t = len(sample.tokens)
    np.testing.assert_allclose(together[i, :t], alone[0, :t], atol=1e-5, rtol=0)
  # and the three budgets really differ for the same sample
  same = inputs_lib.collate([samples[0]] * 3)
  rows = _logits(forward, model, same, per_sample)
  assert np.abs(rows[0] - rows[1]).max() > 1e-2 and np.abs(rows[1] - rows[2]).max() > 1e-2


def test_static_unrolled_budget_equals_scanned(setup):
  """The cost-analysis path (`unroll=True`, budget closed over) computes the same function;
  a numpy budget alone never selects it (one compiled program for every budget)."""
  cfg, _, _, forward, samples = setup
  # 'xla' attention: blockwise's own block loops would blur the count of layer loops below
  cfg = dataclasses.replace(cfg, attention_impl="xla")
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(6))
  _perturb_new_parts(model)
  batch = inputs_lib.collate(samples[:2])
  budget = np.concatenate([budgets.mask(cfg, [1]), budgets.ca_only(cfg)])
  graphdef, state = nnx.split(model)
  static = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, budget, unroll=True))
  closed = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, budget))
  np.testing.assert_allclose(np.asarray(static(state, batch)),
                             _logits(forward, model, batch, budget), atol=1e-5, rtol=0)
  loops = lambda f: f.lower(state, batch).as_text().count("stablehlo.while")
  assert loops(closed) == loops(static) + 1  # the LLM layers: scanned vs unrolled
  with pytest.raises(ValueError, match="concrete budget"):
    jax.jit(lambda st, x, b: nnx.merge(graphdef, st)(x, b, unroll=True))(state, batch, budget)


def test_serving_layout_computes_the_stacked_function(setup):
  """`visor.serving_layout` (one module per layer, no scan, kernels [out, in]) gives the
  stacked model's logits at every budget, mixed per-sample ones included, from one compiled
  program, without the scan over the LLM layers; its weights are their own arrays, axes
  without 'layers'."""
  cfg, _, _, _, samples = setup
  cfg = dataclasses.replace(cfg, attention_impl="xla")  # no attention loops in the count below
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(7))
  _perturb_new_parts(model)
  stacked_def = nnx.graphdef(model)
  forward = jax.jit(lambda st, x, b: nnx.merge(stacked_def, st)(x, b))
  served = visor.serving_layout(model)
  assert len(served.decoder.layers) == cfg.num_layers
  assert len(served.decoder.cross) == len(cfg.visor.ca_layers)
  kernel = served.decoder.layers[2].mlp.gate_proj.kernel  # its own array, stored [out, in]
  np.testing.assert_array_equal(kernel[...], model.decoder.layers.mlp.gate_proj.kernel[...][2].T)
  assert kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
  assert served.decoder.cross[1].attn.q_proj.out_in
  assert isinstance(model.decoder.layers.mlp.gate_proj.kernel[...], jax.Array)  # untouched
  assert model.decoder.layers.mlp.gate_proj.kernel.shape[0] == cfg.num_layers
  batch = inputs_lib.collate(samples)
  graphdef, state = nnx.split(served)
  serve = jax.jit(lambda st, x, b: nnx.merge(graphdef, st)(x, b))
  for budget in (np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg),
                                 budgets.mask(cfg, [1, 5])]),
                 budgets.ca_only(cfg, 3), budgets.all_sa(cfg, 3)):
    np.testing.assert_allclose(np.asarray(serve(state, batch, budget)),
                               _logits(forward, model, batch, budget), atol=1e-5, rtol=0)
  assert serve._cache_size() == 1
  loops = lambda f, st: f.lower(st, batch, budget).as_text().count("stablehlo.while")
  assert loops(serve, state) == loops(forward, nnx.state(model)) - 1  # the LLM layers' scan


def test_bf16_compute_with_f32_params_tracks_f32(setup):
  """model.dtype='bfloat16': bf16 matmuls, float32 params, norms and softmax statistics."""
  cfg, model, _, forward, samples = setup
  m = model_configs.tiny()
  m.dtype = "bfloat16"
  cfg16 = config_lib.model_config(m)
  model16 = LlavaOnevision(cfg16, rngs=nnx.Rngs(0))
  nnx.update(model16, nnx.state(model, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  batch = inputs_lib.collate(samples[:2])
  budget = budgets.mask(cfg, [1], 2)
  ref = _logits(forward, model, batch, budget)
  graphdef16 = nnx.graphdef(model16)
  out = np.asarray(jax.jit(lambda st, x, b: nnx.merge(graphdef16, st)(x, b))(
      nnx.state(model16), batch, budget))
  assert out.dtype == np.float32
  # bf16 keeps 8 bits of mantissa: ~0.4% relative error per op, a few percent after 6 layers.
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < err < 0.05, err
