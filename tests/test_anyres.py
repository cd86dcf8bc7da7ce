"""AnyRes packing plan vs transformers' `LlavaOnevisionModel.pack_image_features` (torch, CPU)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionConfig
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel, image_size_to_num_patches)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from visor_jax.data import anyres
from visor_jax.data.preprocess import DEFAULT_GRID_PINPOINTS

D = 8  # feature width; the plan does not depend on it
SMALL_CROP, SMALL_PATCH = 28, 14  # 2x2 tokens per crop: every code path at toy cost
SMALL_PINPOINTS = tuple((28 * i, 28 * j) for i in range(1, 7) for j in range(1, 7))


def _hf_packer(crop: int, patch: int, pinpoints) -> types.SimpleNamespace:
  """A stand-in `self` for the unbound `pack_image_features`: it only reads `self.config`."""
  cfg = LlavaOnevisionConfig(
      vision_config={"model_type": "siglip_vision_model", "image_size": crop,
                     "patch_size": patch, "hidden_size": D, "intermediate_size": 16,
                     "num_hidden_layers": 1, "num_attention_heads": 2},
      text_config={"model_type": "qwen2", "hidden_size": D, "intermediate_size": 16,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "vocab_size": 32},
      image_grid_pinpoints=[list(p) for p in pinpoints])
  return types.SimpleNamespace(config=cfg)


def _hf_num_tokens(image_hw, crop: int, patch: int, pinpoints, aspect: str) -> int:
  """What `LlavaOnevisionProcessor` expands one `<image>` into (single-image path, 'full')."""
  proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # no tokenizer needed
  proc.image_processor = types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints])
  proc.num_image_tokens = (crop // patch) ** 2
  proc.vision_aspect_ratio = aspect
  return proc._get_number_of_features(image_hw[0], image_hw[1], crop, crop)


def _check_against_hf(image_hw, crop, patch, pinpoints, aspect, *, anyres_=True, seed=0):
  packer = _hf_packer(crop, patch, pinpoints)
  side = crop // patch
  n_crops = anyres.num_crops(image_hw, crop_size=crop, grid_pinpoints=pinpoints, anyres=anyres_)
  if anyres_:
    assert n_crops == image_size_to_num_patches(list(image_hw), [list(p) for p in pinpoints], crop)
  gen = torch.Generator().manual_seed(seed)
  feats = torch.randn(n_crops, side * side, D, generator=gen)
  newline = torch.randn(D, generator=gen)
  plan_fn = lambda: anyres.pack_plan(  # noqa: E731
      image_hw, crop_size=crop, patch_size=patch, grid_pinpoints=pinpoints,
      vision_aspect_ratio=aspect, anyres=anyres_)
  with torch.no_grad():
    try:
      ref, lens = LlavaOnevisionModel.pack_image_features(
          packer, [feats], torch.tensor([list(image_hw)]), image_newline=newline,
          vision_aspect_ratio=aspect)
    except RuntimeError as e:  # extreme aspect ratio: interpolate to an empty map
      assert "greater than 0" in str(e)
      with pytest.raises(ValueError, match="too extreme"):
        plan_fn()
      return None
  ref = ref[0].numpy()

  plan = plan_fn()
  assert plan.src.dtype == np.int32 and plan.weight.dtype == np.float32
  assert plan.newline.dtype == bool and plan.src.shape == plan.weight.shape == (plan.num_tokens, 4)
  assert not plan.weight[plan.newline].any() and not plan.src[plan.newline].any()
  assert not plan.src[plan.weight == 0].any()
  out = anyres.apply_plan_numpy(feats.numpy(), plan, newline.numpy())
  assert plan.num_tokens == ref.shape[0] == int(lens[0]), (image_hw, plan.num_tokens, ref.shape)
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
  if anyres_:
    assert plan.num_tokens == _hf_num_tokens(image_hw, crop, patch, pinpoints, aspect)
  return plan


def _sizes(n: int, seed: int, lo: int = 1, hi: int = 260) -> list[tuple[int, int]]:
  rng = np.random.default_rng(seed)
  out = [tuple(int(x) for x in rng.integers(lo, hi, size=2)) for _ in range(n)]
  # Extreme aspect ratios and exact pinpoint sizes: unpadding on both axes, no unpadding at all.
  return out + [(28, 28), (56, 168), (168, 56), (100, 37), (37, 100), (168, 168), (5, 90),
                (90, 5), (200, 201), (201, 200), (13, 17)]


@pytest.mark.parametrize("aspect", ["anyres_max_1", "anyres_max_2", "anyres_max_9"])
def test_small_geometry_matches_hf(aspect):
  downsampled = unpadded_rows = unpadded_cols = rejected = 0
  for i, hw in enumerate(_sizes(60, seed=len(aspect))):
    plan = _check_against_hf(hw, SMALL_CROP, SMALL_PATCH, SMALL_PINPOINTS, aspect, seed=i)
    if plan is None:
      rejected += 1
      continue
    downsampled += int((plan.weight > 0).sum(1).max() > 1)
    # Coverage bookkeeping only: which axis did unpad_image trim for this size?
    bh, bw = anyres.select_best_resolution(hw, SMALL_PINPOINTS)
    full = (bh // SMALL_PATCH, bw // SMALL_PATCH)
    rows, cols = anyres._unpad_range(hw, full)
    unpadded_rows += int(rows.stop - rows.start < full[0])
    unpadded_cols += int(cols.stop - cols.start < full[1])
  if aspect != "anyres_max_9":
    assert downsampled > 10  # the bilinear path is really exercised
  assert unpadded_rows > 0 and unpadded_cols > 0
  assert rejected <= 10  # thin images at anyres_max_1 with 2x2 crops: HF fails there too


def test_multi_image_path_matches_hf():
  for hw in [(30, 50), (500, 300), (7, 7)]:
    plan = _check_against_hf(hw, SMALL_CROP, SMALL_PATCH, SMALL_PINPOINTS, "anyres_max_9",
                             anyres_=False)
    assert plan.num_tokens == 4 + 1 and plan.newline.tolist() == [False] * 4 + [True]


@pytest.mark.parametrize("image_hw,expected", [((768, 768), 3699), ((2304, 2304), 7371),
                                               ((480, 640), None), ((1080, 1920), None),
                                               ((3000, 400), None)])
def test_real_geometry_matches_hf(image_hw, expected):
  plan = _check_against_hf(image_hw, 384, 14, DEFAULT_GRID_PINPOINTS, "anyres_max_9")
  if expected is not None:
    assert plan.num_tokens == expected


def test_downsample_weights_are_bilinear():
  """Rows of a down-sampled plan are convex combinations of 2x2 neighbours."""
  plan = anyres.pack_plan((2304, 2304), crop_size=384, patch_size=14,
                          grid_pinpoints=DEFAULT_GRID_PINPOINTS)
  tokens = ~plan.newline
  np.testing.assert_allclose(plan.weight[tokens].sum(1), 1.0, atol=1e-6)
  assert (plan.weight >= 0).all()


def test_bad_arguments():
  kw = dict(crop_size=28, patch_size=14, grid_pinpoints=SMALL_PINPOINTS)
  for bad in ["anyres", "anyres_max_", "anyres_max_0", "max_9", "anyres_max_9x", 9]:
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
      anyres.pack_plan((100, 100), vision_aspect_ratio=bad, **kw)
  with pytest.raises(ValueError, match="patch_size"):
    anyres.pack_plan((100, 100), crop_size=14, patch_size=28, grid_pinpoints=((14, 14),))
  with pytest.raises(ValueError, match="multiple of crop_size"):
    anyres.pack_plan((100, 100), crop_size=28, patch_size=14, grid_pinpoints=((28, 30),))
  with pytest.raises(ValueError, match="image_hw"):
    anyres.pack_plan((0, 100), **kw)
  plan = anyres.pack_plan((100, 300), **kw)
  with pytest.raises(ValueError, match="too few crops"):
    anyres.apply_plan_numpy(np.zeros((2, 4, D), np.float32), plan, np.zeros(D, np.float32))
  with pytest.raises(ValueError, match="newline_vec"):
    anyres.apply_plan_numpy(np.zeros((40, 4, D), np.float32), plan, np.zeros(D + 1, np.float32))


def test_bilinear_lambdas_equal_torch_exactly():
  """Interpolating one-hot rows reads PyTorch's per-output weights back bit for bit."""
  for n_in in range(2, 60):
    eye = torch.eye(n_in)[None, :, :, None]                      # [1, C=n_in, H=n_in, W=1]
    for n_out in range(1, n_in):
      ref = torch.nn.functional.interpolate(eye, [n_out, 1], mode="bilinear")[0, :, :, 0].numpy()
      i0, i1, l0, l1 = anyres._bilinear_taps(n_in, n_out)
      mine = np.zeros((n_in, n_out), np.float32)
      np.add.at(mine, (i0, np.arange(n_out)), l0)
      np.add.at(mine, (i1, np.arange(n_out)), l1)
      np.testing.assert_array_equal(mine, ref, err_msg=f"{n_in} -> {n_out}")
