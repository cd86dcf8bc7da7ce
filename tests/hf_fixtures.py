"""Tiny random transformers LLaVA-OneVision models for the tests.

The builder is the package's own (`visor_jax.convert.tiny_checkpoint`, also a command), so the
tests and a user trying the README load the same kind of directory: one written by
transformers' own `save_pretrained`, without a download.
"""
from __future__ import annotations

import numpy as np

from visor_jax.convert import tiny_checkpoint
from visor_jax.convert.tiny_checkpoint import build_hf_model, save_hf_dir, tiny_tokenizer

__all__ = ["build_hf_model", "hf_processor", "random_image", "save_hf_dir", "tiny_tokenizer"]


def hf_processor(model):
  """transformers' image processor for `model`, mean/std 0.5 (as `save_hf_dir` writes)."""
  return tiny_checkpoint.image_processor(model.config)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
