"""`python -m visor_jax.convert.tiny_checkpoint`: an offline LLaVA-OV directory that the
README's loading snippet runs on, the same seed giving the same weights."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from visor_jax import budgets, config_lib, model_configs, runs
from visor_jax.convert import safetensors_io, tiny_checkpoint
from visor_jax.data import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(directory):
  reader = safetensors_io.SafetensorsReader(directory)
  return {k: np.asarray(reader.get(k)) for k in reader.keys()}


def test_command_writes_a_directory_the_readme_snippet_loads(tmp_path):
  out = str(tmp_path / "tiny_llava_ov")
  result = subprocess.run(
      [sys.executable, "-m", "visor_jax.convert.tiny_checkpoint", "--out", out, "--seed", "3"],
      cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"to {out}" in result.stdout
  for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(out, name)), name

  # The same seed writes the same weights (in process this time).
  again = tiny_checkpoint.main(["--out", str(tmp_path / "again"), "--seed", "3"])
  a, b = _tensors(out), _tensors(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # README, "Loading a transformers checkpoint", on this directory.
  run = runs.load_run(out)
  assert run.kind == "transformers"
  tiny = config_lib.model_config(model_configs.tiny())
  assert run.cfg.vision == tiny.vision and run.cfg.text == tiny.text
  model, cfg, tok = run.build_model(), run.cfg, run.tokenizer
  ids = tok.encode("<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
                   "<|im_start|>assistant\n")
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8))
  batch = inputs.collate([inputs.build_sample(ids, [image], cfg, run.image_spec)])
  logits = np.asarray(model(batch, budgets.all_sa(cfg)))
  assert logits.shape == (1, len(ids) - 1, cfg.text.vocab_size)
  assert np.isfinite(logits).all() and logits.std() > 0.5  # random O(1) weights, not flat
