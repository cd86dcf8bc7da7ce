"""A tiny random transformers LLaVA-OneVision directory, built offline: something to load.

    python -m visor_jax.convert.tiny_checkpoint --out=/tmp/tiny_llava_ov [--seed=0]

writes what transformers' `save_pretrained` writes for a randomly initialised
`LlavaOnevisionForConditionalGeneration` of `model_configs.tiny()`'s geometry (config.json,
generation_config.json, model.safetensors), a tokenizer.json trained on a few sentences (with
`<image>` and the ChatML tokens) and a preprocessor_config.json. Its answers are noise: it is
for trying the loading code without downloading a checkpoint, and it is how the tests prove
"loads real checkpoints" through transformers' own `save_pretrained`. The same seed writes the
same weights.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Sequence

import torch
import transformers

from visor_jax import model_configs
from visor_jax.convert import hf_config
from visor_jax.data.tokenizer import Tokenizer, build_tiny_tokenizer

CORPUS = [
    "What colour is the small square next to the triangle? The code reads 4821.",
    "Describe the image in detail. There is a large red circle and two blue squares.",
    "How many large shapes are there? Answer with a number: three, four, five, six.",
    "The quick brown fox jumps over the lazy dog 0123456789 times a day.",
] * 8
HALF = (0.5, 0.5, 0.5)  # what the LLaVA-OV hub checkpoints' preprocessor_config.json ship


def tiny_tokenizer() -> Tokenizer:
  """300 BPE ids from CORPUS, then the special tokens: `<image>` is id 300 (tiny's)."""
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
  """A random transformers LlavaOnevisionForConditionalGeneration of our geometry
  (a `config.model` ConfigDict), float32, eager attention."""
  hf_cfg = transformers.LlavaOnevisionConfig(**hf_config.to_hf_dict(model_cfg))
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.LlavaOnevisionForConditionalGeneration(hf_cfg).eval()
  randomize_(model, seed)
  return model


def image_processor(config, image_mean: Sequence[float] = HALF,
                    image_std: Sequence[float] = HALF):
  """transformers' image processor for a LlavaOnevisionConfig (the PIL one: no torchvision)."""
  size = config.vision_config.image_size
  return transformers.LlavaOnevisionImageProcessorPil(
      image_mean=list(image_mean), image_std=list(image_std),
      size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints)


def save_hf_dir(model, directory, tokenizer: Tokenizer | None = None,
                image_mean: Sequence[float] = HALF, image_std: Sequence[float] = HALF) -> str:
  """`model.save_pretrained`, the tokenizer's files and the image processor's config."""
  model.save_pretrained(directory)
  if tokenizer is not None:
    tokenizer.save(str(directory))
  image_processor(model.config, image_mean, image_std).save_pretrained(directory)
  return str(directory)


def build(out: str, seed: int = 0, image_mean: Sequence[float] = HALF,
          image_std: Sequence[float] = HALF) -> str:
  """Writes the tiny directory to `out`; returns it."""
  model = build_hf_model(model_configs.tiny(), seed)
  return save_hf_dir(model, out, tiny_tokenizer(), image_mean, image_std)


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="Directory to write (created if missing).")
  p.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
  a = p.parse_args(argv)
  out = build(a.out, a.seed)
  print(f"wrote a tiny random LLaVA-OneVision checkpoint to {out}: "
        f"{', '.join(sorted(os.listdir(out)))}")
  return out


if __name__ == "__main__":
  main()
