"""Tiny random transformers LLaVA-OneVision models, built from our configs and saved locally.

This is how the tests prove "loads real checkpoints" without a download: the same code path
reads a directory written by transformers' own `save_pretrained`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import transformers

from visor_jax.convert import hf_config
from visor_jax.data.tokenizer import build_tiny_tokenizer

CORPUS = [
    "What colour is the small square next to the triangle? The code reads 4821.",
    "Describe the image in detail. There is a large red circle and two blue squares.",
    "How many large shapes are there? Answer with a number: three, four, five, six.",
    "The quick brown fox jumps over the lazy dog 0123456789 times a day.",
] * 8


def tiny_tokenizer():
  return build_tiny_tokenizer(CORPUS, vocab_size=300)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
  """Re-draws every weight at a scale that keeps activations O(1).

  transformers' init (std 0.02) makes logits nearly constant, which would let a comparison at
  1e-4 pass vacuously; these weights give logits with a spread of several units.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        fan_in = math.prod(p.shape[1:])
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
      elif "norm" in name or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_hf_model(model_cfg, seed: int = 0):
  """A random transformers LlavaOnevisionForConditionalGeneration with our geometry, f32."""
  hf_cfg = transformers.LlavaOnevisionConfig(**hf_config.to_hf_dict(model_cfg))
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.LlavaOnevisionForConditionalGeneration(hf_cfg).eval()
  randomize_(model, seed)
  return model


def save_hf_dir(model, directory, tokenizer=None, image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5)) -> str:
  model.save_pretrained(directory)
  if tokenizer is not None:
    tokenizer.save(str(directory))
  cfg = model.config
  proc = transformers.LlavaOnevisionImageProcessorPil(
      image_mean=list(image_mean), image_std=list(image_std),
      size={"height": cfg.vision_config.image_size, "width": cfg.vision_config.image_size},
      image_grid_pinpoints=cfg.image_grid_pinpoints)
  proc.save_pretrained(directory)
  return str(directory)


def hf_processor(model):
  cfg = model.config
  return transformers.LlavaOnevisionImageProcessorPil(
      image_mean=[0.5] * 3, image_std=[0.5] * 3,
      size={"height": cfg.vision_config.image_size, "width": cfg.vision_config.image_size},
      image_grid_pinpoints=cfg.image_grid_pinpoints)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
