"""Full-size configs without memory: jax.eval_shape of init and forward; parameter counts vs
transformers' own model built on the meta device from the same config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from visor_jax import config_lib, model_configs
from visor_jax.convert import hf_config
from visor_jax.models.llava_onevision import LlavaOnevision, abstract_inputs

VISOR_PARTS = ("decoder.cross.", "decoder.pos_conv.")


def _abstract(m):
  cfg = config_lib.model_config(m)
  return cfg, nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0)))


def _counts(model):
  base = visor = 0
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(map(str, path))
    n = int(np.prod(v.shape))
    if name.startswith(VISOR_PARTS):
      visor += n
    else:
      base += n
  return base, visor


@pytest.mark.parametrize("name", ["llava_ov_0_5b", "llava_ov_7b"])
def test_param_count_matches_transformers(name):
  m = model_configs.get(name)
  cfg, model = _abstract(m)
  base, visor = _counts(model)
  with torch.device("meta"):
    hf = transformers.LlavaOnevisionForConditionalGeneration(
        transformers.LlavaOnevisionConfig(**hf_config.to_hf_dict(m)))
  assert base == sum(p.numel() for p in hf.parameters())
  # VISOR adds one attention + two norms per CA layer and the positional conv.
  t = cfg.text
  per_ca = (t.hidden_size * t.num_heads * t.head_dim * 2 + t.num_heads * t.head_dim
            + 2 * (t.hidden_size * t.num_kv_heads * t.head_dim + t.num_kv_heads * t.head_dim)
            + 2 * t.hidden_size)
  pos_conv = 7 * t.hidden_size + t.hidden_size ** 2 + 2 * t.hidden_size
  assert visor == len(cfg.visor.ca_layers) * per_ca + pos_conv
  # 'spread uniformly': every third layer (L/3 rounded up for CA, down for SA at L=28)
  assert cfg.visor.ca_layers == tuple(range(0, t.num_layers, 3))
  assert cfg.visor.sa_candidates == tuple(range(1, t.num_layers, 3))


@pytest.mark.parametrize("name", ["llava_ov_0_5b", "llava_ov_7b"])
def test_forward_eval_shape_at_full_size(name):
  cfg, model = _abstract(model_configs.get(name))
  graphdef, state = nnx.split(model)
  b, t, p, n = 1, 64, 37, 7371  # a 2304x2304 image: 37 crops, 7,371 visual tokens
  sds = jax.ShapeDtypeStruct
  inputs = abstract_inputs(cfg, b, t, p, n)
  out = jax.eval_shape(lambda st, x, bud: nnx.merge(graphdef, st)(x, bud), state, inputs,
                       sds((b, cfg.num_layers), jnp.bool_))
  assert out.shape == (b, t, cfg.text.vocab_size) and out.dtype == jnp.float32


def test_default_layer_layout():
  cfg = config_lib.model_config(model_configs.llava_ov_0_5b())
  assert cfg.visor.ca_layers == tuple(range(0, 24, 3))
  assert cfg.visor.sa_candidates == tuple(range(1, 24, 3))
