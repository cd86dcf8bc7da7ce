"""Host-side image preprocessing, bit-identical to transformers' `LlavaOnevisionImageProcessorPil`.

Runs in data-loader workers, so it imports only numpy and PIL. Every step repeats the exact call
HF makes on the same dtype (PIL resizes on uint8 RGB images, zero padding on uint8, rescale in
float64 then cast to float32, normalise in float32), because the vision tower is sensitive to
sub-ulp input differences and checkpoint parity is tested bit-for-bit.

Output layout is NHWC (channels last): `float32[P, S, S, 3]` where view 0 is the whole image
resized to S x S and views 1.. are the crops of the best-fit grid in row-major order.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image

from visor_jax import paths

BICUBIC = int(PIL.Image.Resampling.BICUBIC)

# HF's default `image_grid_pinpoints`: every (h, w) with h, w in {384, 768, ..., 2304}, h-major.
# The order matters: `select_best_resolution` keeps the first of equally good candidates.
DEFAULT_GRID_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))


@dataclasses.dataclass(frozen=True)
class ImageProcessorSpec:
  """What `LlavaOnevisionImageProcessorPil` needs to know; defaults = real LLaVA-OV checkpoints.

  `image_mean`/`image_std` default to 0.5 (what the checkpoints' preprocessor_config.json ship),
  not HF's class default OPENAI_CLIP_MEAN/STD.
  """
  crop_size: int = 384
  grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_GRID_PINPOINTS  # (height, width)
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  rescale_factor: float = 1 / 255
  resample: int = BICUBIC

  def __post_init__(self):
    # Normalise to hashable tuples so lists (e.g. from JSON) work too.
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
    if not isinstance(self.crop_size, (int, np.integer)) or self.crop_size <= 0:
      raise ValueError(f"crop_size must be a positive int, got {self.crop_size!r}.")
    set_("crop_size", int(self.crop_size))
    set_("grid_pinpoints", _check_pinpoints(self.grid_pinpoints))
    for name in ("image_mean", "image_std"):
      value = getattr(self, name)
      try:  # HF also accepts one number for all channels.
        value = (float(value),) * 3 if np.ndim(value) == 0 else tuple(float(x) for x in value)
      except (TypeError, ValueError):
        value = ()
      if len(value) != 3:
        raise ValueError(f"{name} must be 3 numbers (RGB), got {getattr(self, name)!r}.")
      set_(name, value)
    if any(s == 0 for s in self.image_std):
      raise ValueError(f"image_std must be non-zero, got {self.image_std!r}.")
    if not isinstance(self.rescale_factor, (int, float)) or self.rescale_factor <= 0:
      raise ValueError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}.")
    set_("rescale_factor", float(self.rescale_factor))
    valid = {int(r) for r in PIL.Image.Resampling}
    if int(self.resample) not in valid:
      raise ValueError(f"resample={self.resample!r} is not a PIL resampling filter "
                       f"{sorted(valid)}.")
    set_("resample", int(self.resample))

  def to_hf_dict(self) -> dict[str, Any]:
    """transformers' `LlavaOnevisionImageProcessor` config (preprocessor_config.json) for this
    spec; `from_hf_dict` reads it back to an equal spec."""
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "do_resize": True, "size": {"height": self.crop_size, "width": self.crop_size},
        "resample": self.resample, "do_rescale": True, "rescale_factor": self.rescale_factor,
        "do_normalize": True, "image_mean": list(self.image_mean),
        "image_std": list(self.image_std), "do_pad": True, "do_convert_rgb": True,
        "image_grid_pinpoints": [list(p) for p in self.grid_pinpoints],
    }

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike) -> "ImageProcessorSpec":
    """Reads a HF checkpoint directory.

    Hub checkpoints ship `preprocessor_config.json`; transformers 5's
    `ProcessorMixin.save_pretrained` instead writes a single `processor_config.json` with the image
    processor nested under `"image_processor"`, so both are accepted (the first one found wins).
    """
    pre = paths.join(path, "preprocessor_config.json")
    proc = paths.join(path, "processor_config.json")
    if paths.isfile(pre):
      source, cfg = pre, _read_json(pre)
    elif paths.isfile(proc):
      source, cfg = proc, _read_json(proc).get("image_processor")
      if not isinstance(cfg, dict):
        raise ValueError(f"{proc}: no 'image_processor' entry (a dict) in it.")
    else:
      raise ValueError(f"{path}: neither preprocessor_config.json nor processor_config.json found.")
    return cls.from_hf_dict(cfg, source=source)

  @classmethod
  def from_hf_dict(cls, cfg: Mapping[str, Any], *, source: str = "config") -> "ImageProcessorSpec":
    """Builds a spec from an image-processor config dict, rejecting settings we do not mirror."""
    def bad(field: str, why: str) -> ValueError:
      return ValueError(f"{source}: field {field!r} {why} (got {cfg.get(field)!r}).")

    size = cfg.get("size")
    if not isinstance(size, dict):
      raise bad("size", "is missing or not a dict")
    if size.get("height") is not None or size.get("width") is not None:
      if size.get("height") != size.get("width"):
        raise bad("size", "must be square: height == width")
      crop = size.get("height")
    else:
      crop = size.get("shortest_edge")
    if not isinstance(crop, int) or crop <= 0:
      raise bad("size", "must give a positive int 'height'/'width' or 'shortest_edge'")
    # HF cuts the grid into crop_size['height'] tiles when crop_size is set; we only support the
    # (universal) case where that equals the resize target.
    crop_cfg = cfg.get("crop_size")
    if isinstance(crop_cfg, dict) and crop_cfg.get("height") not in (None, crop):
      raise bad("crop_size", f"must be absent or equal to size ({crop})")
    for flag in ("do_resize", "do_rescale", "do_normalize"):
      if cfg.get(flag, True) is not True:
        raise bad(flag, "must be true (only the standard pipeline is mirrored)")
    if cfg.get("do_center_crop"):
      raise bad("do_center_crop", "must be false/absent")
    try:
      _check_pinpoints(cfg["image_grid_pinpoints"])
    except (KeyError, ValueError) as e:
      raise bad("image_grid_pinpoints", "is missing or not non-empty (height, width) pairs") from e
    kwargs: dict[str, Any] = {"crop_size": crop}
    for field, key in (("image_grid_pinpoints", "grid_pinpoints"), ("image_mean", "image_mean"),
                       ("image_std", "image_std"), ("rescale_factor", "rescale_factor"),
                       ("resample", "resample")):
      if field in cfg:
        kwargs[key] = cfg[field]
    try:
      return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the message names the field (same names as HF's)
      raise ValueError(f"{source}: invalid image processor config: {e}") from e


def _read_json(path: str) -> dict:
  with paths.open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object.")
  return data


def _check_pinpoints(pinpoints: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
  try:
    out = tuple((int(h), int(w)) for h, w in pinpoints)
  except (TypeError, ValueError) as e:
    raise ValueError(f"grid_pinpoints must be (height, width) int pairs, got {pinpoints!r}.") from e
  if not out or any(h <= 0 or w <= 0 for h, w in out):
    raise ValueError(f"grid_pinpoints must be non-empty positive (height, width) pairs, got "
                     f"{pinpoints!r}.")
  return out


def select_best_resolution(image_hw: tuple[int, int],
                           pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The (h, w) pinpoint keeping most of the image's pixels, then wasting fewest.

  Same arithmetic and tie-breaking (first wins, strict comparisons) as HF's
  `image_processing_utils.select_best_resolution`; the model side must agree with the data side.
  """
  original_height, original_width = image_hw
  best_fit = None
  max_effective, min_wasted = 0, float("inf")
  for height, width in pinpoints:
    scale = min(width / original_width, height / original_height)
    down_w, down_h = int(original_width * scale), int(original_height * scale)
    effective = min(down_w * down_h, original_width * original_height)
    wasted = width * height - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      max_effective, min_wasted = effective, wasted
      best_fit = (int(height), int(width))
  if best_fit is None:
    raise ValueError(f"no usable pinpoint for image size {tuple(image_hw)} in {pinpoints!r}.")
  return best_fit


def _patch_output_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
  """Aspect-preserving size that fits `target_hw` (HF `get_patch_output_size`, ceil rounding)."""
  original_height, original_width = image_hw
  target_height, target_width = target_hw
  scale_w, scale_h = target_width / original_width, target_height / original_height
  if scale_w < scale_h:
    return min(math.ceil(original_height * scale_w), target_height), target_width
  return target_height, min(math.ceil(original_width * scale_h), target_width)


def _to_rgb(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
  """An RGB PIL image with the exact pixels HF's `convert_to_rgb` produces.

  Transparency is composited onto white (HF semantics), single-channel arrays are repeated.
  """
  if isinstance(image, PIL.Image.Image):
    if image.width == 0 or image.height == 0:
      raise ValueError(f"zero-size image: PIL size (w, h) = {image.size}.")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      rgba = image.convert("RGBA")
      white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")

  if not isinstance(image, np.ndarray):
    raise ValueError(f"unsupported image type {type(image).__name__}: expected a PIL.Image or a "
                     "uint8 numpy array.")
  if image.dtype != np.uint8:
    raise ValueError(f"numpy image dtype must be uint8, got {image.dtype}.")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f"numpy image must have rank 2 (HxW) or 3 (HxWxC), got shape {image.shape}.")
  if image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"numpy image must be channels-last with 1, 3 or 4 channels, got shape "
                     f"{image.shape}.")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"zero-size image: shape {image.shape}.")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    # HF's numpy RGBA path: float64 blend onto white, then round.
    alpha = image[..., 3:4] / 255
    image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return PIL.Image.fromarray(np.ascontiguousarray(image))


def _resize(image: np.ndarray | PIL.Image.Image, hw: tuple[int, int], resample: int) -> np.ndarray:
  """uint8[h, w, 3] via one PIL resize (PIL returns a copy when the size is unchanged, as in HF)."""
  if isinstance(image, np.ndarray):
    image = PIL.Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(image.resize((hw[1], hw[0]), resample=resample))


def _anyres_views(image: PIL.Image.Image, spec: ImageProcessorSpec) -> list[np.ndarray]:
  """[base view, crop_0, crop_1, ...] as uint8 arrays (HF `get_image_patches`)."""
  s = spec.crop_size
  image_hw = (image.height, image.width)
  best_h, best_w = select_best_resolution(image_hw, spec.grid_pinpoints)
  new_h, new_w = _patch_output_size(image_hw, (best_h, best_w))
  resized = _resize(image, (new_h, new_w), spec.resample)                   # uint8[h', w', 3]
  top, extra_h = divmod(best_h - new_h, 2)
  left, extra_w = divmod(best_w - new_w, 2)
  padded = np.pad(resized, ((top, top + extra_h), (left, left + extra_w), (0, 0)))  # zeros, uint8
  crops = [padded[i:i + s, j:j + s] for i in range(0, best_h, s) for j in range(0, best_w, s)]
  return [_resize(image, (s, s), spec.resample)] + crops


def _pad_to_square(image: PIL.Image.Image, spec: ImageProcessorSpec) -> np.ndarray:
  """uint8[m, m, 3] centred on the mean colour (HF's multi-image `pad_to_square`)."""
  rgb = np.asarray(image)
  h, w = rgb.shape[:2]
  if h == w:
    return rgb
  m = max(h, w)
  # HF: background_color = tuple(int(x * 255) for x in image_mean), truncation not rounding.
  out = np.empty((m, m, 3), np.uint8)
  out[:] = np.array([int(x * 255) for x in spec.image_mean], dtype=np.uint8)
  if w > h:
    top = (m - h) // 2
    out[top:top + h] = rgb
  else:
    left = (m - w) // 2
    out[:, left:left + w] = rgb
  return out


def preprocess_image(image: PIL.Image.Image | np.ndarray, spec: ImageProcessorSpec, *,
                     anyres: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
  """Pixels for the vision tower and the original (height, width) the packing plan needs.

  Args:
    image: a PIL image (any mode) or a uint8 numpy array HxW / HxWx{1,3,4} (channels last).
    spec: processor settings.
    anyres: True = HF's single-image path (base view + best-fit crop grid); False = HF's
      multi-image path (pad to a square in the mean colour, one view).
  Returns:
    (pixels float32[P, S, S, 3], image_hw) with P = 1 + grid crops (anyres) or 1.
  """
  rgb = _to_rgb(image)
  image_hw = (rgb.height, rgb.width)
  s = spec.crop_size
  views = _anyres_views(rgb, spec) if anyres else [_pad_to_square(rgb, spec)]
  # HF resizes every view to S x S again (a no-op copy unless a pinpoint is not a multiple of S).
  pixels_u8 = np.stack([_resize(v, (s, s), spec.resample) for v in views])  # uint8[P, S, S, 3]
  return _normalize_lut(spec)[pixels_u8, np.arange(3)], image_hw


def _normalize_lut(spec: ImageProcessorSpec) -> np.ndarray:
  """float32[256, 3]: HF's rescale + normalize for every uint8 value and channel.

  Same ops, same dtypes (rescale: float64 multiply then cast to float32; normalize: float32
  (x - mean) / std), so a lookup gives identical bits at a fraction of the cost.
  """
  rescaled = (np.arange(256, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
  mean = np.array(spec.image_mean, dtype=np.float32)
  std = np.array(spec.image_std, dtype=np.float32)
  return (rescaled[:, None] - mean) / std
