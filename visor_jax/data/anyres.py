"""AnyRes packing plan: HF `LlavaOnevisionModel.pack_image_features` as a static gather.

HF packs vision features with data-dependent reshapes, slicing (`unpad_image`) and bilinear
down-sampling, which a jitted JAX model cannot do per sample. All of that depends only on the
image size, so the host computes it once as a *plan*: output token n is either the image newline
or `sum_k weight[n, k] * flat[src[n, k]]` over at most 4 taps of the flattened crop features
`flat = features.reshape(P * h * w, D)`. The device then does one gather + weighted sum.

Token order (as HF): the base view's h*w tokens, then the unpadded (and possibly down-sampled)
crop-grid feature map row by row, each row followed by one newline. The multi-image path
(`anyres=False`, one crop) is that crop's h*w tokens then one newline.

numpy only: this runs in data-loader workers.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from visor_jax.data.preprocess import select_best_resolution

NUM_TAPS = 4


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """out[n] = newline_vec if newline[n] else sum_k weight[n, k] * flat[src[n, k]].

  Unused taps and newline rows have src 0 and weight 0, so a device-side gather never reads
  out of bounds (note 0 * inf = nan: the features must be finite, as they are).
  """
  src: np.ndarray      # int32[N, 4]   row indices into flat features [P*h*w, D]
  weight: np.ndarray   # float32[N, 4]
  newline: np.ndarray  # bool[N]

  @property
  def num_tokens(self) -> int:
    return int(self.newline.shape[0])


def parse_vision_aspect_ratio(vision_aspect_ratio: str) -> int:
  """'anyres_max_N' -> N, the target number of crop-sized feature maps after down-sampling."""
  m = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio) if isinstance(
      vision_aspect_ratio, str) else None
  if m is None or int(m.group(1)) <= 0:
    raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r}: expected 'anyres_max_N' with "
                     "N >= 1.")
  return int(m.group(1))


def _grid_shape(image_hw: tuple[int, int], crop_size: int,
                grid_pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """(rows, cols) of crops HF's model assumes (`get_anyres_image_grid_shape`, floor division)."""
  best_h, best_w = select_best_resolution(image_hw, grid_pinpoints)
  return best_h // crop_size, best_w // crop_size


def num_crops(image_hw: tuple[int, int], *, crop_size: int,
              grid_pinpoints: Sequence[Sequence[int]], anyres: bool = True) -> int:
  """Views the preprocessor makes: 1 base + the grid crops (HF `image_size_to_num_patches`)."""
  if not anyres:
    return 1
  best_h, best_w = select_best_resolution(image_hw, grid_pinpoints)
  return 1 + math.ceil(best_h / crop_size) * math.ceil(best_w / crop_size)


def _unpad_range(original: tuple[int, int], current: tuple[int, int]) -> tuple[slice, slice]:
  """Rows/cols of the grid feature map that hold the image rather than padding (`unpad_image`).

  Same float expressions and `round(., 7)` as HF so the kept extent agrees to the token.
  """
  original_height, original_width = original
  current_height, current_width = current
  if original_width / original_height > current_width / current_height:
    new_height = int(round(original_height * (current_width / original_width), 7))
    pad = (current_height - new_height) // 2
    return slice(pad, current_height - pad), slice(0, current_width)
  new_width = int(round(original_width * (current_height / original_height), 7))
  pad = (current_width - new_width) // 2
  return slice(0, current_height), slice(pad, current_width - pad)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray]:
  """PyTorch bilinear (align_corners=False, no antialias) along one axis, in float32.

  PyTorch computes the index math in the op-math type (float32 for float/bf16 inputs):
  scale = in / out; src = max(fma(scale, dst + 0.5, -0.5), 0); i0 = min(floor(src), in - 1);
  i1 = i0 + (i0 < in - 1); l1 = clamp(src - i0, 0, 1); l0 = 1 - l1.
  Returns (i0 int64[out], i1 int64[out], l0 float32[out], l1 float32[out]).
  """
  f32 = np.float32
  if in_size == out_size:  # PyTorch's shortcut: identity, exact.
    idx = np.arange(out_size)
    return idx, idx, np.ones(out_size, f32), np.zeros(out_size, f32)
  scale = f32(in_size) / f32(out_size)
  # PyTorch's x86 CPU kernel (built for AVX2/AVX512 with FMA contraction) evaluates
  # scale * (dst + 0.5) - 0.5 as one fused multiply-add; the float64 product of two float32s is
  # exact, so rounding once to float32 emulates it (checked bit-for-bit in tests/test_anyres.py).
  dst = np.arange(out_size, dtype=f32) + f32(0.5)
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = i0 + (i0 < in_size - 1)
  l1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
  l0 = (f32(1) - l1).astype(f32)
  return i0, i1, l0, l1


def pack_plan(image_hw: tuple[int, int], *, crop_size: int, patch_size: int,
              grid_pinpoints: Sequence[Sequence[int]], vision_aspect_ratio: str = "anyres_max_9",
              anyres: bool = True) -> PackPlan:
  """The gather plan reproducing `pack_image_features` for one image of size `image_hw`.

  Args:
    image_hw: original (height, width) of the image, as returned by `preprocess_image`.
    crop_size, patch_size: vision tower geometry; h = w = crop_size // patch_size tokens a side.
    grid_pinpoints: (height, width) pairs, multiples of crop_size (HF's model assumes so).
    vision_aspect_ratio: 'anyres_max_N'; the unpadded map is down-sampled to about N crops' worth.
    anyres: False for the multi-image path (a single crop, no grid).
  """
  max_num_patches = parse_vision_aspect_ratio(vision_aspect_ratio)
  # Not necessarily a multiple: SigLIP's 384 / 14 gives 27 patches a side (the conv drops the rest).
  if patch_size <= 0 or crop_size < patch_size:
    raise ValueError(f"crop_size={crop_size} and patch_size={patch_size} must satisfy "
                     "0 < patch_size <= crop_size.")
  height, width = (int(x) for x in image_hw)
  if height <= 0 or width <= 0:
    raise ValueError(f"image_hw={tuple(image_hw)} must be positive.")
  side = crop_size // patch_size
  per_crop = side * side
  base = np.arange(per_crop, dtype=np.int64)

  if not anyres:
    return _assemble(base, np.zeros((0, NUM_TAPS), np.int64), np.zeros((0, NUM_TAPS), np.float32),
                     rows=1, cols=0)

  for ph, pw in grid_pinpoints:
    if ph % crop_size or pw % crop_size:
      raise ValueError(f"grid_pinpoints: {(ph, pw)} is not a multiple of crop_size={crop_size}.")
  grid_rows, grid_cols = _grid_shape((height, width), crop_size, grid_pinpoints)

  # Flat feature index of every position of the full grid feature map [gr*h, gc*w]
  # (HF: view(gr, gc, h, w, D).permute(D, gr, h, gc, w)); crop k+1 is grid cell (k // gc, k % gc).
  y = np.arange(grid_rows * side)[:, None]
  x = np.arange(grid_cols * side)[None, :]
  crop = 1 + (y // side) * grid_cols + (x // side)
  full = crop * per_crop + (y % side) * side + (x % side)      # int64[gr*h, gc*w]

  rows, cols = _unpad_range((height, width), full.shape)
  fmap = full[rows, cols]                                        # int64[H', W']
  cur_h, cur_w = fmap.shape
  ratio = math.sqrt(cur_h * cur_w / (max_num_patches * side**2))
  if ratio > 1.1:
    out_h, out_w = int(cur_h // ratio), int(cur_w // ratio)
    if out_h <= 0 or out_w <= 0:
      # torch.nn.functional.interpolate rejects empty outputs too; only extreme aspect ratios.
      raise ValueError(f"image_hw={tuple(image_hw)}: aspect ratio too extreme, down-sampling a "
                       f"{cur_h}x{cur_w} feature map gives {out_h}x{out_w}.")
    i0, i1, a0, a1 = _bilinear_taps(cur_h, out_h)
    j0, j1, b0, b1 = _bilinear_taps(cur_w, out_w)
    src = np.stack([fmap[i0][:, j0], fmap[i0][:, j1], fmap[i1][:, j0], fmap[i1][:, j1]], axis=-1)
    weight = np.stack([np.outer(a0, b0), np.outer(a0, b1), np.outer(a1, b0), np.outer(a1, b1)],
                      axis=-1).astype(np.float32)
  else:
    out_h, out_w = cur_h, cur_w
    src = np.zeros((out_h, out_w, NUM_TAPS), np.int64)
    src[..., 0] = fmap
    weight = np.zeros((out_h, out_w, NUM_TAPS), np.float32)
    weight[..., 0] = 1
  return _assemble(base, src.reshape(-1, NUM_TAPS), weight.reshape(-1, NUM_TAPS),
                   rows=out_h, cols=out_w)


def _assemble(base: np.ndarray, grid_src: np.ndarray, grid_weight: np.ndarray, *, rows: int,
              cols: int) -> PackPlan:
  """[base tokens] + for each of `rows` rows: `cols` grid tokens then one newline.

  With rows=1, cols=0 this is the multi-image layout: the crop's tokens then a newline.
  """
  n_base = base.shape[0]
  n = n_base + rows * (cols + 1)
  src = np.zeros((n, NUM_TAPS), np.int32)
  weight = np.zeros((n, NUM_TAPS), np.float32)
  newline = np.zeros((n,), bool)
  src[:n_base, 0] = base
  weight[:n_base, 0] = 1
  # Row r occupies positions n_base + r*(cols+1) ... ; its last slot is the newline.
  body = np.arange(rows * (cols + 1)).reshape(rows, cols + 1) + n_base
  src[body[:, :cols].reshape(-1)] = grid_src
  weight[body[:, :cols].reshape(-1)] = grid_weight
  newline[body[:, cols]] = True
  src[weight == 0] = 0  # canonical form: a zero-weight bilinear tap is an unused tap
  return PackPlan(src=src, weight=weight, newline=newline)


def apply_plan_numpy(features: np.ndarray, plan: PackPlan, newline_vec: np.ndarray) -> np.ndarray:
  """Reference execution of a plan: float[P, h*w, D] crop features -> float[N, D] tokens.

  This is the computation the JAX model mirrors (gather, weighted sum over taps, newline select).
  """
  features, newline_vec = np.asarray(features), np.asarray(newline_vec)
  if features.ndim != 3:
    raise ValueError(f"features must be [P, h*w, D], got shape {features.shape}.")
  p, hw, d = features.shape
  if newline_vec.shape != (d,):
    raise ValueError(f"newline_vec must have shape ({d},), got {newline_vec.shape}.")
  if plan.num_tokens and int(plan.src.max()) >= p * hw:
    raise ValueError(f"plan reads feature row {int(plan.src.max())} but features have only "
                     f"{p}x{hw} rows (too few crops for this image?).")
  flat = features.reshape(p * hw, d)                                  # float[P*h*w, D]
  taps = flat[plan.src]                                               # float[N, 4, D]
  out = np.einsum("nk,nkd->nd", plan.weight.astype(flat.dtype), taps)  # float[N, D]
  out[plan.newline] = newline_vec
  return out
