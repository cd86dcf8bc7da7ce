"""Generation: the KV cache reproduces uncached full forwards; the cache keeps VISOR's saving."""
import numpy as np
import pytest
from flax import nnx

import hf_fixtures
from model_fixtures import perturb_new_parts, prompt_ids
from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import inputs as inputs_lib
from visor_jax.inference.generate import Generator, _layer_tables
from visor_jax.models.llava_onevision import LlavaOnevision

NEW = 6


@pytest.fixture(scope="module")
def setup():
  m = model_configs.tiny()
  m.router.feasible = [[], [4], [1, 4]]
  cfg = config_lib.model_config(m)
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(2))
  perturb_new_parts(model)
  tok = hf_fixtures.tiny_tokenizer()
  prompts = ["What colour is the small square?", "Read the code.", "How many shapes?"]
  sizes = [(40, 70), (84, 84), (20, 60)]
  samples = [inputs_lib.build_sample(prompt_ids(tok, p), [hf_fixtures.random_image(*hw, seed=i)],
                                     cfg) for i, (p, hw) in enumerate(zip(prompts, sizes))]
  return cfg, model, Generator(model), samples


def _uncached_greedy(model, sample, budget_row, steps):
  """Reference: re-run the full forward on the growing prompt, no cache."""
  fwd = nnx.jit(lambda m, x, b: m(x, b))
  tokens = list(sample.tokens)
  text_pos = list(sample.text_pos)
  last = max(text_pos[-1], sample.vis_pos[-1] if len(sample.vis_pos) else -1)
  out = []
  for _ in range(steps):
    s = inputs_lib.Sample(np.asarray(tokens, np.int32), np.asarray(text_pos, np.int32),
                          sample.pixels, sample.vis_src, sample.vis_weight, sample.vis_newline,
                          sample.vis_pos)
    batch = inputs_lib.collate([s], text_len=len(sample.tokens) + steps)
    logits = np.asarray(fwd(model, batch, budget_row[None]))[0, len(tokens) - 1]
    out.append(int(np.argmax(logits)))
    last += 1
    tokens.append(out[-1])
    text_pos.append(last)
  return out


@pytest.mark.parametrize("layers", [list(range(6)), [], [1], [1, 4]])
def test_cached_generation_equals_uncached_forwards(setup, layers):
  cfg, model, gen, samples = setup
  row = budgets.mask(cfg, layers)[0]
  out = gen.generate(inputs_lib.collate(samples[:1]), budget=row[None], max_new_tokens=NEW)
  assert out.tokens[0].tolist() == _uncached_greedy(model, samples[0], row, NEW)


def test_batch_with_different_budgets_equals_each_alone(setup):
  cfg, model, gen, samples = setup
  rows = np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg),
                         budgets.mask(cfg, [1])])
  out = gen.generate(inputs_lib.collate(samples), budget=rows, max_new_tokens=NEW)
  for i, s in enumerate(samples):
    assert out.tokens[i].tolist() == _uncached_greedy(model, s, rows[i], NEW), i
  np.testing.assert_array_equal(out.budget, rows)


def test_kv_cache_holds_visual_entries_only_for_layers_that_ran(setup):
  cfg, _, gen, samples = setup
  batch = inputs_lib.collate(samples[:1])
  full = gen.generate(batch, budget=budgets.all_sa(cfg), max_new_tokens=2).cache_bytes[0]
  two = gen.generate(batch, budget=budgets.mask(cfg, [1, 4]),
                     max_new_tokens=2).cache_bytes[0]
  t_max = batch["tokens"].shape[1] + 2
  n = batch["vis_valid"].shape[1]
  per_entry = 2 * cfg.text.num_kv_heads * cfg.text.head_dim * 4  # k and v, float32
  L = cfg.num_layers
  n_ca_two = len(_layer_tables(cfg, budgets.mask(cfg, [1, 4])[0])["ca_slot"].nonzero()[0])
  assert full == per_entry * (L * t_max + L * n)             # every layer SA, no CA runs
  assert two == per_entry * (L * t_max + 2 * n + 2 * n)       # 2 SA + 2 CA (layers 0, 3)
  assert two < full
  print(f"KV cache bytes: full {full}, 2-SA {two} ({two / full:.2f}x); text {L * t_max}, "
        f"visual entries {L * n} vs {4 * n}")
  del n_ca_two


def test_router_budgets_group_and_threshold_moves_flops(setup):
  cfg, model, gen, samples = setup
  batch = inputs_lib.collate(samples)
  routed = nnx.jit(lambda m, x, th: m.routed(x, th))
  sa_counts = []
  for th in (0.05, 0.3, 0.6, 0.9, 1.0):
    out = gen.generate(batch, threshold=th, max_new_tokens=2)
    ref = routed(model, batch, th)
    np.testing.assert_array_equal(out.budget, np.asarray(ref["budget"]))
    for row in out.budget:
      assert tuple(np.flatnonzero(row)) in cfg.router.feasible
    sa_counts.append(out.budget.sum())
  assert sa_counts == sorted(sa_counts)
  assert sa_counts[-1] == 2 * len(samples)  # threshold 1: the most expensive feasible budget


def test_sampling_is_seeded_and_top_p_zero_is_greedy(setup):
  cfg, _, gen, samples = setup
  batch = inputs_lib.collate(samples[:2])
  b = budgets.mask(cfg, [1], 2)
  greedy = gen.generate(batch, budget=b, max_new_tokens=NEW).tokens
  a = gen.generate(batch, budget=b, max_new_tokens=NEW, temperature=1.0, seed=3).tokens
  again = gen.generate(batch, budget=b, max_new_tokens=NEW, temperature=1.0, seed=3).tokens
  np.testing.assert_array_equal(a, again)
  nucleus = gen.generate(batch, budget=b, max_new_tokens=NEW, temperature=1.0, top_p=1e-6,
                         seed=5).tokens
  np.testing.assert_array_equal(nucleus, greedy)


def test_stop_tokens_end_a_sample(setup):
  cfg, _, gen, samples = setup
  batch = inputs_lib.collate(samples[:1])
  b = budgets.ca_only(cfg)
  first = gen.generate(batch, budget=b, max_new_tokens=NEW).tokens[0].tolist()
  out = gen.generate(batch, budget=b, max_new_tokens=NEW, stop_ids=[first[0]])
  assert out.num_tokens[0] == 1 and out.tokens[0].tolist() == first[:1] + [-1] * (NEW - 1)
  never = next(t for t in range(cfg.text.vocab_size) if t not in first)
  out = gen.generate(batch, budget=b, max_new_tokens=NEW, stop_ids=[never])
  assert out.num_tokens[0] == NEW and out.tokens[0].tolist() == first
