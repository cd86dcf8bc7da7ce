"""Host preprocessing vs transformers' `LlavaOnevisionImageProcessorPil`: bit-identical pixels."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from transformers import LlavaOnevisionImageProcessorPil
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from visor_jax.data import anyres
from visor_jax.data.preprocess import (DEFAULT_GRID_PINPOINTS, ImageProcessorSpec,
                                       preprocess_image, select_best_resolution)

SMALL = ImageProcessorSpec(crop_size=28,
                           grid_pinpoints=tuple((28 * i, 28 * j) for i in (1, 2, 3)
                                                for j in (1, 2, 3)))


def _hf(spec: ImageProcessorSpec, **overrides) -> LlavaOnevisionImageProcessorPil:
  kw = dict(image_mean=list(spec.image_mean), image_std=list(spec.image_std),
            size={"height": spec.crop_size, "width": spec.crop_size},
            image_grid_pinpoints=[list(p) for p in spec.grid_pinpoints],
            rescale_factor=spec.rescale_factor, resample=spec.resample)
  kw.update(overrides)
  return LlavaOnevisionImageProcessorPil(**kw)


def _hf_single(spec, image):
  """HF's single-image (anyres) output as float32[P, S, S, 3] and its image size."""
  out = _hf(spec)([image], return_tensors="np")
  pixels = out["pixel_values"][0]                     # [P, 3, S, S] (one image: no batch padding)
  return pixels.transpose(0, 2, 3, 1), tuple(int(x) for x in out["image_sizes"][0])


def _random_image(rng, h, w, c=3):
  shape = (h, w) if c is None else (h, w, c)
  return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _assert_same(spec, image, ours_input=None):
  ref, ref_hw = _hf_single(spec, image)
  ours, hw = preprocess_image(image if ours_input is None else ours_input, spec)
  assert ours.dtype == np.float32 and ours.shape == ref.shape, (ours.shape, ref.shape)
  assert hw == ref_hw
  assert np.array_equal(ours, ref), np.abs(ours - ref).max()
  return ours


@pytest.mark.parametrize("hw", [(300, 500), (500, 300), (1000, 1000), (1200, 150), (20, 37),
                                (384, 1152)])
def test_real_geometry_bit_identical(hw):
  rng = np.random.default_rng(sum(hw))
  image = _random_image(rng, *hw)
  ours = _assert_same(ImageProcessorSpec(), image)
  assert ours.shape[0] == anyres.num_crops(hw, crop_size=384,
                                           grid_pinpoints=DEFAULT_GRID_PINPOINTS)
  if hw == (1000, 1000):
    assert ours.shape[0] == 10  # 1152x1152 -> 3x3 grid + base


def test_small_geometry_many_grid_shapes():
  rng = np.random.default_rng(0)
  shapes = set()
  for _ in range(40):
    h, w = (int(x) for x in rng.integers(5, 120, size=2))
    ours = _assert_same(SMALL, _random_image(rng, h, w))
    shapes.add(select_best_resolution((h, w), SMALL.grid_pinpoints))
    assert ours.shape[0] == anyres.num_crops((h, w), crop_size=28,
                                             grid_pinpoints=SMALL.grid_pinpoints)
  assert len(shapes) >= 6  # most of the 3x3 grid shapes were exercised


def test_clip_mean_and_pinpoints_not_multiple_of_crop():
  """Non-default normalisation, and partial crops that HF resizes back to S x S."""
  spec = ImageProcessorSpec(crop_size=28, grid_pinpoints=((28, 40), (40, 28), (50, 50)),
                            image_mean=(0.48145466, 0.4578275, 0.40821073),
                            image_std=(0.26862954, 0.26130258, 0.27577711))
  rng = np.random.default_rng(1)
  for hw in [(30, 45), (45, 30), (60, 55)]:
    _assert_same(spec, _random_image(rng, *hw))


def test_pil_modes_and_channel_layouts():
  rng = np.random.default_rng(2)
  rgb = _random_image(rng, 40, 70)
  gray = _random_image(rng, 40, 70, c=None)
  alpha = _random_image(rng, 40, 70, c=None)
  rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
  palette = PIL.Image.fromarray(rgb).convert("P")
  palette.info["transparency"] = 5
  for image in [PIL.Image.fromarray(rgb), PIL.Image.fromarray(gray),          # RGB, L
                PIL.Image.fromarray(rgba),                                    # RGBA
                PIL.Image.fromarray(np.stack([gray, alpha], -1)),             # LA
                palette, PIL.Image.fromarray(rgb).convert("CMYK"),
                gray[..., None], rgba]:                                       # numpy HxWx1 / x4
    _assert_same(SMALL, image)
  # HF rejects a bare HxW array; ours treats it as HxWx1 (what HF does with the explicit axis).
  _assert_same(SMALL, gray[..., None], ours_input=gray)
  # A PIL image and the equivalent array give the same pixels.
  assert np.array_equal(preprocess_image(PIL.Image.fromarray(rgb), SMALL)[0],
                        preprocess_image(rgb, SMALL)[0])


def test_multi_image_path_bit_identical():
  """anyres=False: HF's path for a sample with several images (pad to square, one view)."""
  rng = np.random.default_rng(3)
  clip = ImageProcessorSpec(crop_size=28, image_mean=(0.48145466, 0.4578275, 0.40821073),
                            image_std=(0.26862954, 0.26130258, 0.27577711))
  for spec in [SMALL, clip, ImageProcessorSpec()]:  # clip: per-channel padding colour
    images = [_random_image(rng, 50, 90), _random_image(rng, 90, 50), _random_image(rng, 64, 64)]
    ref = _hf(spec)([images], return_tensors="np")["pixel_values"][0]   # [3 images, 3, S, S]
    for image, want in zip(images, ref):
      ours, hw = preprocess_image(image, spec, anyres=False)
      assert ours.shape == (1, spec.crop_size, spec.crop_size, 3) and hw == image.shape[:2]
      assert np.array_equal(ours[0], want.transpose(1, 2, 0))


def test_select_best_resolution_matches_hf():
  rng = np.random.default_rng(4)
  pinpoints = [list(p) for p in DEFAULT_GRID_PINPOINTS]
  sizes = [tuple(int(x) for x in rng.integers(1, 4000, size=2)) for _ in range(300)]
  sizes += [(384, 384), (768, 384), (1, 1), (2304, 2304), (5000, 10)]
  for hw in sizes:
    assert select_best_resolution(hw, DEFAULT_GRID_PINPOINTS) == hf_select_best_resolution(
        hw, pinpoints)


def test_from_hf_dir_round_trip(tmp_path):
  spec = ImageProcessorSpec(crop_size=28, grid_pinpoints=((28, 28), (28, 56), (56, 28)),
                            image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
  # Hub layout: preprocessor_config.json (ImageProcessor.save_pretrained).
  _hf(spec).save_pretrained(tmp_path / "hub")
  assert ImageProcessorSpec.from_hf_dir(tmp_path / "hub") == spec
  # transformers 5 ProcessorMixin.save_pretrained layout: everything in processor_config.json,
  # image processor nested under "image_processor" (written by the same `to_json_file`).
  proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # no tokenizer download
  proc.image_processor = _hf(spec)
  proc.num_image_tokens, proc.vision_aspect_ratio = 4, "anyres_max_9"
  proc.vision_feature_select_strategy, proc.chat_template = "full", None
  (tmp_path / "proc").mkdir()
  proc.to_json_file(tmp_path / "proc" / "processor_config.json")
  assert ImageProcessorSpec.from_hf_dir(tmp_path / "proc") == spec
  # Defaults = the real checkpoints' config.
  _hf(ImageProcessorSpec()).save_pretrained(tmp_path / "default")
  assert ImageProcessorSpec.from_hf_dir(tmp_path / "default") == ImageProcessorSpec()


def test_to_hf_dict_is_what_from_hf_dict_and_transformers_read(tmp_path):
  """What an export writes as preprocessor_config.json: every field we mirror survives, and
  transformers' processor built from it preprocesses bit-identically to the spec."""
  spec = ImageProcessorSpec(crop_size=28, grid_pinpoints=((28, 40), (40, 28), (50, 50)),
                            image_mean=(0.48145466, 0.4578275, 0.40821073),
                            image_std=(0.26862954, 0.26130258, 0.27577711),
                            resample=int(PIL.Image.Resampling.BILINEAR))
  assert ImageProcessorSpec.from_hf_dict(spec.to_hf_dict()) == spec
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(spec.to_hf_dict()))
  hf = LlavaOnevisionImageProcessorPil.from_pretrained(tmp_path)
  image = _random_image(np.random.default_rng(2), 45, 30)
  theirs = hf([image], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(preprocess_image(image, spec)[0], theirs)


def _write_config(path, **changes):
  cfg = {"size": {"height": 28, "width": 28}, "image_grid_pinpoints": [[28, 28]],
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}
  cfg.update(changes)
  cfg = {k: v for k, v in cfg.items() if v is not None}
  path.mkdir(exist_ok=True)
  (path / "preprocessor_config.json").write_text(json.dumps(cfg))
  return path


@pytest.mark.parametrize("changes,field", [
    (dict(size=None), "size"),
    (dict(size={"height": 28, "width": 30}), "size"),
    (dict(size={"height": 0, "width": 0}), "size"),
    (dict(image_grid_pinpoints=None), "image_grid_pinpoints"),
    (dict(image_grid_pinpoints=[[28]]), "image_grid_pinpoints"),
    (dict(image_grid_pinpoints=[]), "image_grid_pinpoints"),
    (dict(image_mean=[0.5, 0.5]), "image_mean"),
    (dict(image_mean="gray"), "image_mean"),
    (dict(image_std=[0.5, 0.0, 0.5]), "image_std"),
    (dict(resample=99), "resample"),
    (dict(crop_size={"height": 14, "width": 14}), "crop_size"),
    (dict(do_normalize=False), "do_normalize"),
])
def test_from_hf_dir_errors(tmp_path, changes, field):
  with pytest.raises(ValueError, match=field):
    ImageProcessorSpec.from_hf_dir(_write_config(tmp_path / "cfg", **changes))


def test_from_hf_dir_missing_files(tmp_path):
  with pytest.raises(ValueError, match="preprocessor_config.json"):
    ImageProcessorSpec.from_hf_dir(tmp_path)
  (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
  with pytest.raises(ValueError, match="image_processor"):
    ImageProcessorSpec.from_hf_dir(tmp_path)


@pytest.mark.parametrize("image,problem", [
    (np.zeros((4, 5, 6, 3), np.uint8), "rank"),
    (np.zeros((5,), np.uint8), "rank"),
    (np.zeros((5, 6, 2), np.uint8), "channels"),
    (np.zeros((5, 6, 3), np.float32), "dtype"),
    (np.zeros((0, 6, 3), np.uint8), "zero-size"),
    (np.zeros((6, 0), np.uint8), "zero-size"),
    (PIL.Image.new("RGB", (0, 5)), "zero-size"),
    ([[1, 2], [3, 4]], "unsupported image type"),
])
def test_bad_inputs(image, problem):
  with pytest.raises(ValueError, match=problem):
    preprocess_image(image, SMALL)
