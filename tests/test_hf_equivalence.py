"""Our LLaVA-OV (loaded from a transformers directory) equals transformers' logits, in float32."""
import numpy as np
import pytest
import torch
from flax import nnx

import hf_fixtures
from visor_jax import budgets
from visor_jax.convert import hf_import
from visor_jax.data import inputs as inputs_lib
from visor_jax.data import preprocess
from visor_jax import model_configs

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
  torch.set_num_threads(2)
  hf_model = hf_fixtures.build_hf_model(model_configs.tiny())
  tok = hf_fixtures.tiny_tokenizer()
  directory = hf_fixtures.save_hf_dir(hf_model, tmp_path_factory.mktemp("hf_tiny"), tok)
  model, cfg = hf_import.load_hf_model(directory)
  forward = nnx.jit(lambda m, x, b: m(x, b))
  return hf_model, tok, directory, model, cfg, forward


def _prompt(tok, with_image: bool):
  head = tok.encode("<|im_start|>user\n")
  tail = tok.encode("\nWhat colour is the small square?<|im_end|>\n<|im_start|>assistant\n")
  return head + ([tok.image_token_id] if with_image else []) + tail


def _hf_logits(hf_model, tok, ids, sample, image=None):
  """transformers' forward on the expanded prompt; logits at our text positions."""
  expanded = []
  for t in ids:
    expanded += [t] * (sample.num_visual_tokens if t == tok.image_token_id else 1)
  kw = {}
  if image is not None:
    proc = hf_fixtures.hf_processor(hf_model)(images=[image], return_tensors="pt")
    kw = dict(pixel_values=proc["pixel_values"], image_sizes=proc["image_sizes"])
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor([expanded]), **kw).logits[0].numpy()
  return out[sample.text_pos]


def _our_logits(forward, model, cfg, sample, budget=None):
  batch = inputs_lib.collate([sample])
  budget = budgets.all_sa(cfg, 1) if budget is None else budget
  return np.asarray(forward(model, batch, budget))[0, :len(sample.tokens)]


# (height, width): wide, tall, square multi-crop (3x3 grid → anyres_max_4 down-sampling),
# and a small one that is a single 28x28 crop plus base view.
IMAGE_SIZES = [(40, 70), (90, 33), (84, 84), (20, 26)]


@pytest.mark.parametrize("hw", IMAGE_SIZES)
def test_image_prompt_logits_match_transformers(hf_setup, hw):
  hf_model, tok, _, model, cfg, forward = hf_setup
  image = hf_fixtures.random_image(*hw, seed=hw[0])
  ids = _prompt(tok, with_image=True)
  sample = inputs_lib.build_sample(ids, [image], cfg,
                                   preprocess.ImageProcessorSpec.from_hf_dir(hf_setup[2]))
  ref = _hf_logits(hf_model, tok, ids, sample, image)
  ours = _our_logits(forward, model, cfg, sample)
  assert ref.std() > 0.5, "logits too flat for the comparison to mean anything"
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_downsampling_case_is_exercised(hf_setup):
  """(84, 84) tiles 3x3 crops = 6x6 patches > 4 crops' worth: anyres_max_4 must shrink it."""
  _, tok, directory, _, cfg, _ = hf_setup
  sample = inputs_lib.build_sample(_prompt(tok, True), [hf_fixtures.random_image(84, 84)], cfg,
                                   preprocess.ImageProcessorSpec.from_hf_dir(directory))
  undownsampled = 4 + 6 * (6 + 1)  # base view + 6 rows of 6 tokens and a newline
  assert sample.num_visual_tokens < undownsampled
  assert len(sample.pixels) == 10


def test_text_only_logits_match_transformers(hf_setup):
  hf_model, tok, _, model, cfg, forward = hf_setup
  ids = _prompt(tok, with_image=False)
  sample = inputs_lib.build_sample(ids, [], cfg)
  ref = _hf_logits(hf_model, tok, ids, sample)
  np.testing.assert_allclose(_our_logits(forward, model, cfg, sample), ref, atol=TOL, rtol=0)


def test_legacy_and_module_key_spellings_load_identically(hf_setup, tmp_path):
  """transformers-5 module names (model.language_model...) load like hub names."""
  hf_model, _, directory, model, cfg, _ = hf_setup
  from visor_jax.convert import safetensors_io
  reader = safetensors_io.SafetensorsReader(directory)
  renamed = {k: np.array(reader.get(k)) for k in reader.keys()}
  renamed = {("model." + k.replace("language_model.model.", "language_model.")
              if not k.startswith("language_model.lm_head") else "lm_head.weight"): v
             for k, v in renamed.items()}
  import shutil
  for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
    shutil.copy(f"{directory}/{name}", tmp_path / name)
  safetensors_io.save_file(renamed, str(tmp_path / "model.safetensors"))
  other, _ = hf_import.load_hf_model(str(tmp_path))
  a, b = hf_import.flat_params(model), hf_import.flat_params(other)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_sharded_checkpoint_with_index_loads(hf_setup, tmp_path):
  hf_model, _, _, model, _, _ = hf_setup
  hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  other, _ = hf_import.load_hf_model(str(tmp_path))
  a, b = hf_import.flat_params(model), hf_import.flat_params(other)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_missing_tensor_and_shape_mismatch_name_the_tensor(hf_setup, tmp_path):
  _, _, directory, _, _, _ = hf_setup
  from visor_jax.convert import safetensors_io
  import shutil
  reader = safetensors_io.SafetensorsReader(directory)
  tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
  shutil.copy(f"{directory}/config.json", tmp_path / "config.json")
  key = "language_model.model.layers.1.mlp.up_proj.weight"
  safetensors_io.save_file({k: v for k, v in tensors.items() if k != key},
                           str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
    hf_import.load_hf_model(str(tmp_path))
  tensors["multi_modal_projector.linear_2.weight"] = np.zeros((3, 3), np.float32)
  safetensors_io.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="multi_modal_projector.linear_2.weight"):
    hf_import.load_hf_model(str(tmp_path))


def test_tokenizer_matches_transformers(hf_setup):
  _, tok, directory, _, _, _ = hf_setup
  import transformers
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{directory}/tokenizer.json")
  text = "<|im_start|>user\n<image>\nHow many large shapes?<|im_end|>\n"
  assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
  assert tok.encode("<image>") == [tok.image_token_id]
