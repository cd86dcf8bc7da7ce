"""The analytic FLOPs count agrees with XLA's, reproduces the method note's numbers, and the CLI
prints its table."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import model_fixtures

from visor_jax import budgets, config_lib, flops, model_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reduced():
  """Matmul-dominated but quick to compile: width 256, head_dim 64, 400 visual tokens.

  One SigLIP layer: XLA counts a scan body once (see test_xla_counts_a_scan_body_once).
  """
  cfg, shape = model_fixtures.xla_check_config()
  assert cfg.visor.ca_layers == (0, 3) and cfg.visor.sa_candidates == (1, 4)
  return cfg, shape


@pytest.fixture(scope="module")
def xla_counts(reduced):
  cfg, shape = reduced
  budgets_ = {"all_sa": range(cfg.num_layers), "ca_only": [], "sa_1_4": [1, 4]}
  return {name: (flops.forward_flops(cfg, sa_layers=sa, **shape)["total"],
                 flops.xla_forward_flops(cfg, sa_layers=sa, **shape))
          for name, sa in budgets_.items()}


@pytest.mark.parametrize("name", ["all_sa", "ca_only", "sa_1_4"])
def test_analytic_total_matches_xla(xla_counts, name):
  analytic, xla = xla_counts[name]
  assert abs(xla / analytic - 1) < 0.05, (name, analytic, xla)


def test_budget_differences_match_xla(xla_counts):
  """The vision tower is common to all budgets; the LLM-only differences must agree too."""
  for name in ("all_sa", "sa_1_4"):
    analytic = xla_counts[name][0] - xla_counts["ca_only"][0]
    xla = xla_counts[name][1] - xla_counts["ca_only"][1]
    assert abs(xla / analytic - 1) < 0.05, (name, analytic, xla)


def test_xla_counts_a_scan_body_once():
  """Why the check needs static budgets and a depth-1 tower (jax 0.10.2 behaviour)."""
  def f(x, w):
    return jax.lax.scan(lambda h, wl: (h @ wl, None), x, w)[0]
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  w = jax.ShapeDtypeStruct((6, 128, 128), jnp.float32)
  cost = jax.jit(f).lower(x, w).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  one = 2 * 64 * 128 * 128
  assert cost["flops"] == pytest.approx(one, rel=0.01)  # not 6 * one


def test_xla_check_refuses_a_scanned_tower():
  m = model_configs.tiny()  # 2 vision layers
  with pytest.raises(ValueError, match="lax.scan"):
    flops.xla_forward_flops(config_lib.model_config(m), num_crops=1, num_visual=4,
                            num_text=4, sa_layers=[])


@pytest.fixture(scope="module")
def cfg_0_5b():
  return config_lib.model_config(model_configs.llava_ov_0_5b())


@pytest.mark.parametrize("side, crops, tokens, lo, hi", [
    (768, 5, 3699, 0.35, 0.55),     # method note: ~45%
    (2304, 37, 7371, 0.6, 0.8),     # method note: ~70% (≈24 TFLOPs vision vs ≈10 LLM)
])
def test_vision_share_at_0_5b(cfg_0_5b, side, crops, tokens, lo, hi):
  assert flops.image_tokens(cfg_0_5b, (side, side)) == (crops, tokens)
  f = flops.llava_ov_flops(cfg_0_5b, num_crops=crops, num_visual=tokens, num_text=64)
  assert lo < (f["vision"] + f["projector"]) / f["total"] < hi
  if side == 2304:
    assert 22e12 < f["vision"] < 26e12 and 9e12 < f["llm"] < 11e12


def test_llm_share_at_7b():
  """Method note: at 7B the LLM is ~83% of the 2304² prefill."""
  cfg = config_lib.model_config(model_configs.llava_ov_7b())
  f = flops.llava_ov_flops(cfg, num_crops=37, num_visual=7371, num_text=64)
  assert 0.78 < f["llm"] / f["total"] < 0.88


def test_saving_monotone_in_sa_count(cfg_0_5b):
  shape = dict(num_crops=37, num_visual=7371, num_text=64)
  base = flops.llava_ov_flops(cfg_0_5b, **shape)
  llm, total = [], []
  for k in range(len(cfg_0_5b.visor.sa_candidates) + 1):
    layers = budgets.spread_layers(cfg_0_5b.visor.sa_candidates, k)
    f = flops.forward_flops(cfg_0_5b, sa_layers=layers, **shape)
    llm.append(base["llm"] / f["llm"])
    total.append(base["total"] / f["total"])
  assert all(a > b for a, b in zip(llm, llm[1:])) and llm[-1] > 1
  assert all(a > b for a, b in zip(total, total[1:])) and total[-1] > 1


def test_all_sa_visor_costs_llava_ov_plus_pos_conv(cfg_0_5b):
  """Every layer SA: no CA module runs, so VISOR = LLaVA-OV + the positional conv."""
  shape = dict(num_crops=5, num_visual=3699, num_text=64)
  visor = flops.forward_flops(cfg_0_5b, sa_layers=range(24), **shape)
  base = flops.llava_ov_flops(cfg_0_5b, **shape)
  assert visor["llm_ca"] == 0
  assert visor["total"] == pytest.approx(base["total"] + visor["pos_conv"])


def test_cli_prints_the_table():
  out = subprocess.run(
      [sys.executable, "-m", "visor_jax.flops", "--config=configs/llava_ov_0_5b.py"],
      cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
  assert "37 crops, 7371 visual tokens" in out
  for row in ("LLaVA-OV (all 24 SA)", "VISOR 0 SA", "VISOR 1 SA", "VISOR 2 SA", "VISOR 4 SA",
              "VISOR 8 SA"):
    assert row in out
