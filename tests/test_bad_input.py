"""Bad input gets a clear error naming the problem, before anything compiles."""
import numpy as np
import pytest
from flax import nnx

import hf_fixtures
from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import inputs as inputs_lib
from visor_jax.data import preprocess
from visor_jax.models.llava_onevision import LlavaOnevision


@pytest.fixture(scope="module")
def setup():
  cfg = config_lib.model_config(model_configs.tiny())
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
  tok = hf_fixtures.tiny_tokenizer()
  ids = tok.encode("<|im_start|>user\n") + [tok.image_token_id] + tok.encode("\nHi?<|im_end|>")
  sample = inputs_lib.build_sample(ids, [hf_fixtures.random_image(30, 40)], cfg)
  return cfg, model, tok, ids, sample


def _model_with_layers(**visor):
  m = model_configs.tiny()
  m.visor.update(visor)
  return config_lib.model_config(m)


@pytest.mark.parametrize("image, match", [
    (np.zeros((4, 30, 40, 3), np.uint8), "rank|dimension|shape"),
    (np.zeros((30, 40, 3), np.float32), "dtype|uint8"),
    (np.zeros((30, 40, 5), np.uint8), "channel"),
    (np.zeros((0, 40, 3), np.uint8), "size|empty|zero"),
])
def test_bad_images_are_named(image, match):
  with pytest.raises(ValueError, match=match):
    preprocess.preprocess_image(image, preprocess.ImageProcessorSpec(
        crop_size=28, grid_pinpoints=((28, 28), (28, 56))))


def test_image_without_placeholder(setup):
  cfg, _, tok, _, _ = setup
  with pytest.raises(ValueError, match="placeholder"):
    inputs_lib.build_sample(tok.encode("no image here"), [hf_fixtures.random_image(30, 40)], cfg)


def test_budget_of_wrong_length(setup):
  cfg, model, _, _, sample = setup
  batch = inputs_lib.collate([sample])
  with pytest.raises(ValueError, match="budget"):
    model(batch, np.ones((1, cfg.num_layers + 1), bool))
  with pytest.raises(ValueError, match="budget"):
    budgets.check_mask(cfg, np.ones(cfg.num_layers - 1, bool), batch=1)
  with pytest.raises(ValueError, match="budget"):
    budgets.mask(cfg, [cfg.num_layers])


def test_pixels_of_wrong_rank_or_dtype(setup):
  cfg, model, _, _, sample = setup
  batch = inputs_lib.collate([sample])
  with pytest.raises(ValueError, match="pixels"):
    model({**batch, "pixels": batch["pixels"][0]}, budgets.all_sa(cfg))
  with pytest.raises(ValueError, match="pixels"):
    model({**batch, "pixels": batch["pixels"].astype(np.uint8)}, budgets.all_sa(cfg))


@pytest.mark.parametrize("visor, field", [
    (dict(ca_layers=[0, 6]), "model.visor.ca_layers"),
    (dict(sa_candidates=[-1]), "model.visor.sa_candidates"),
    (dict(ca_layers=[2, 2]), "model.visor.ca_layers"),
    (dict(ca_gate="sigmoid"), "model.visor.ca_gate"),
    (dict(pos_conv_kernel=6), "model.visor.pos_conv_kernel"),
])
def test_invalid_layer_config_names_the_field(visor, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    _model_with_layers(**visor)


def test_invalid_geometry_names_the_field():
  m = model_configs.tiny()
  m.text.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads"):
    config_lib.model_config(m)
  m = model_configs.tiny()
  m.feature_layer = 7
  with pytest.raises(ValueError, match="model.feature_layer"):
    config_lib.model_config(m)
