"""Token ids + images → the model's input arrays (host side, numpy only).

The prompt carries one image placeholder token per image (`<image>`, unexpanded). Each
placeholder is replaced by that image's visual tokens *in position space only*: text tokens
and visual tokens go to separate streams, each token keeping the position it has in the
original interleaved LLaVA-OV sequence. `collate` pads samples into one batch of static shape.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from visor_jax.config_lib import ModelConfig
from visor_jax.data import anyres, preprocess


@dataclasses.dataclass
class Sample:
  """One example, unpadded."""
  tokens: np.ndarray       # int32[T]
  text_pos: np.ndarray     # int32[T]
  pixels: np.ndarray       # float32[P, S, S, 3]
  vis_src: np.ndarray      # int32[N, 4]
  vis_weight: np.ndarray   # float32[N, 4]
  vis_newline: np.ndarray  # bool[N]
  vis_pos: np.ndarray      # int32[N]

  @property
  def num_visual_tokens(self) -> int:
    return len(self.vis_pos)


def processor_spec(cfg: ModelConfig, **overrides) -> preprocess.ImageProcessorSpec:
  """The image-processor settings implied by the model geometry."""
  kw = dict(crop_size=cfg.vision.image_size, grid_pinpoints=cfg.image_grid_pinpoints)
  kw.update(overrides)
  return preprocess.ImageProcessorSpec(**kw)


def build_sample(token_ids: Sequence[int], images: Sequence, cfg: ModelConfig,
                 spec: preprocess.ImageProcessorSpec | None = None) -> Sample:
  """Splits a tokenised prompt with image placeholders into the two streams.

  One image → AnyRes (base view + crop grid); several images → one padded-square crop each,
  exactly as LLaVA-OV's processor treats multi-image prompts.
  """
  spec = spec or processor_spec(cfg)
  token_ids = np.asarray(token_ids, np.int64)
  if token_ids.ndim != 1:
    raise ValueError(f"token_ids: expected a 1-D sequence, got shape {token_ids.shape}.")
  n_placeholders = int(np.sum(token_ids == cfg.image_token_id))
  if n_placeholders != len(images):
    raise ValueError(
        f"prompt has {n_placeholders} image placeholder token(s) (id {cfg.image_token_id}) "
        f"but {len(images)} image(s) were given: each image needs exactly one placeholder.")
  use_anyres = len(images) == 1
  patches = cfg.vision.num_patches
  crops, src, weight, newline, vis_pos = [], [], [], [], []
  tokens, text_pos = [], []
  pos, n_crops, image_iter = 0, 0, iter(images)
  for tok in token_ids:
    if tok != cfg.image_token_id:
      tokens.append(tok)
      text_pos.append(pos)
      pos += 1
      continue
    pixels, image_hw = preprocess.preprocess_image(next(image_iter), spec, anyres=use_anyres)
    plan = anyres.pack_plan(image_hw, crop_size=cfg.vision.image_size,
                            patch_size=cfg.vision.patch_size,
                            grid_pinpoints=cfg.image_grid_pinpoints,
                            vision_aspect_ratio=cfg.vision_aspect_ratio, anyres=use_anyres)
    crops.append(pixels)
    src.append(plan.src + n_crops * patches)
    weight.append(plan.weight)
    newline.append(plan.newline)
    vis_pos.append(np.arange(pos, pos + plan.num_tokens))
    pos += plan.num_tokens
    n_crops += len(pixels)
  s = cfg.vision.image_size
  cat = lambda xs, shape, dtype: (np.concatenate(xs).astype(dtype) if xs
                                  else np.zeros(shape, dtype))
  return Sample(
      tokens=np.asarray(tokens, np.int32), text_pos=np.asarray(text_pos, np.int32),
      pixels=cat(crops, (0, s, s, 3), np.float32), vis_src=cat(src, (0, 4), np.int32),
      vis_weight=cat(weight, (0, 4), np.float32), vis_newline=cat(newline, (0,), bool),
      vis_pos=cat(vis_pos, (0,), np.int32))


def collate(samples: Sequence[Sample], *, text_len: int | None = None,
            num_visual: int | None = None, num_crops: int | None = None) -> dict[str, np.ndarray]:
  """Pads samples into static-shape arrays (sizes default to the batch maxima).

  Padding text tokens get positions after the sample's last token; padding visual tokens and
  crops are zeros; `*_valid` marks the real entries.
  """
  t = text_len or max(len(x.tokens) for x in samples)
  n = num_visual if num_visual is not None else max(x.num_visual_tokens for x in samples)
  p = num_crops if num_crops is not None else max(len(x.pixels) for x in samples)
  p = max(p, 1)
  s = samples[0].pixels.shape[1]  # crop side (pixels is [0, S, S, 3] without images)
  b = len(samples)
  out = dict(
      tokens=np.zeros((b, t), np.int32), text_pos=np.zeros((b, t), np.int32),
      text_valid=np.zeros((b, t), bool), vis_src=np.zeros((b, n, 4), np.int32),
      vis_weight=np.zeros((b, n, 4), np.float32), vis_newline=np.zeros((b, n), bool),
      vis_pos=np.zeros((b, n), np.int32), vis_valid=np.zeros((b, n), bool))
  pixels = []
  for i, x in enumerate(samples):
    for name, size, limit in (("text", len(x.tokens), t), ("visual", x.num_visual_tokens, n),
                              ("crop", len(x.pixels), p)):
      if size > limit:
        raise ValueError(f"sample {i}: {size} {name} tokens exceed the padded length {limit}.")
    k, m = len(x.tokens), x.num_visual_tokens
    last = max([-1, *x.text_pos[-1:], *x.vis_pos[-1:]])
    out["tokens"][i, :k] = x.tokens
    out["text_pos"][i, :k] = x.text_pos
    out["text_pos"][i, k:] = last + 1 + np.arange(t - k)
    out["text_valid"][i, :k] = True
    out["vis_src"][i, :m] = x.vis_src
    out["vis_weight"][i, :m] = x.vis_weight
    out["vis_newline"][i, :m] = x.vis_newline
    out["vis_pos"][i, :m] = x.vis_pos
    out["vis_valid"][i, :m] = True
    pixels.append(x.pixels)
  out["pixels"] = np.zeros((b, p, s, s, 3), np.float32)
  for i, px in enumerate(pixels):
    out["pixels"][i, :len(px)] = px
  return out
