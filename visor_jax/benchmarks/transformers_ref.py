"""transformers' LLaVA-OV on our inputs: the reference the speed benchmarks compare with."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np


def model_and_inputs(model_cfg: Any, sample, token_ids: Sequence[int], image: np.ndarray):
  """transformers' LLaVA-OV (float32, sdpa, random weights of `model_cfg`'s geometry) and our
  prompt as its inputs → (model, {input_ids, image_sizes}, pixel_values float[1, P, 3, S, S]).
  input_ids: the image placeholder expanded to the sample's visual token count (as
  tests/test_hf_equivalence.py does); pixel_values: our crops, NCHW."""
  import torch
  import transformers

  from visor_jax.convert import hf_config

  torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = transformers.LlavaOnevisionConfig(**hf_config.to_hf_dict(model_cfg))
  hf_cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = transformers.LlavaOnevisionForConditionalGeneration(hf_cfg).eval()
  expanded = []
  for t in token_ids:
    expanded += [t] * (sample.num_visual_tokens if t == model_cfg.image_token_id else 1)
  pixels = torch.from_numpy(np.ascontiguousarray(sample.pixels.transpose(0, 3, 1, 2))[None])
  return model, dict(input_ids=torch.tensor([expanded]),
                     image_sizes=torch.tensor([list(image.shape[:2])])), pixels
