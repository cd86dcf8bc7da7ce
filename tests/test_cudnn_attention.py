"""`attention_impl='cudnn'` (models/cudnn_attention.py). No GPU here, so the wrapper runs with
`jax.nn.dot_product_attention`'s 'xla' implementation of the very arguments it gives cuDNN
(`KERNEL`): tokens sorted by position, `is_causal` and per-sample sequence lengths. Equal to
the 'xla' reference on every valid row (forward and gradients) for causal self-attention out
of position order with padding and for unmasked attention; cross-attention goes to blockwise;
a whole model's logits equal the reference's; float32 compute is refused by the config."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from model_fixtures import (assert_valid_rows_equal, cross_attention_case, self_attention_case,
                            tiny_models_and_samples, unmasked_case)
from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import inputs as inputs_lib
from visor_jax.models import cudnn_attention
from visor_jax.models.llava_onevision import LlavaOnevision

ATOL = 1e-5


@pytest.fixture(autouse=True)
def xla_kernel(monkeypatch):
  """The cuDNN call's arguments, computed by XLA (the kernel itself needs an NVIDIA GPU)."""
  monkeypatch.setattr(cudnn_attention, "KERNEL", "xla")


def test_causal_self_attention_out_of_position_order_with_padding():
  case = self_attention_case()
  assert cudnn_attention.use_cudnn(case[3])
  assert_valid_rows_equal("cudnn", *case)


def test_unmasked_attention():
  assert_valid_rows_equal("cudnn", *unmasked_case())


def test_cross_attention_goes_to_blockwise(monkeypatch):
  """Text queries over visual keys at other positions: no causal flag says that, so the
  kernel is never called (it would raise) and blockwise answers, exactly."""
  case = cross_attention_case()
  assert not cudnn_attention.use_cudnn(case[3])
  monkeypatch.setattr(cudnn_attention, "KERNEL", "no such kernel")
  assert_valid_rows_equal("cudnn", *case)


def test_config_refuses_float32_compute_with_cudnn():
  m = model_configs.tiny()
  m.attention_impl = "cudnn"
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    config_lib.model_config(m)
  m.dtype = "bfloat16"
  assert config_lib.model_config(m).attention_impl == "cudnn"


def test_tiny_model_logits_equal_reference():
  """Mixed per-sample budget: SigLIP (unmasked), the LLM's text and SA paths (sorted causal)
  through the wrapper, CA through blockwise; float32 here (the config would ask for bf16 on a
  GPU), so the comparison is exact to float32 rounding."""
  cfg, models, samples = tiny_models_and_samples(("xla",))
  reference = models["xla"]
  model = LlavaOnevision(dataclasses.replace(cfg, attention_impl="cudnn"), rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(reference))
  batch = inputs_lib.collate(samples)
  budget = np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg), budgets.mask(cfg, [1, 4])])
  valid = np.asarray(batch["text_valid"])
  out = {}
  for name, m in (("cudnn", model), ("xla", reference)):
    graphdef, state = nnx.split(m)
    out[name] = np.asarray(jax.jit(lambda st, g=graphdef: nnx.merge(g, st)(batch, budget))(state))
  np.testing.assert_allclose(out["cudnn"][valid], out["xla"][valid], atol=ATOL, rtol=0)
  assert np.abs(out["xla"][valid]).max() > 0.1  # not a vacuous comparison
