"""runs.load_run: one loader for an Orbax run (self-describing), a transformers directory and an
exported one; clear errors for anything else."""
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from visor_jax import runs, sharding
from visor_jax.data import synthetic
from visor_jax.data.tokenizer import build_tiny_tokenizer


def _flat(params):
  return traverse_util.flatten_dict(jax.device_get(params), sep=".")


def test_orbax_run_describes_itself(tiny_run):
  run = runs.load_run(tiny_run)
  assert run.kind == "orbax" and run.step == 4 and run.workdir == tiny_run
  assert run.config.num_steps == 4 and run.cfg.num_layers == 6
  assert run.system_prompt == run.config.data.system_prompt
  # The tokenizer is the checkpoint's own copy: the embedded synthetic one, byte for byte.
  built = build_tiny_tokenizer(synthetic.corpus(), vocab_size=300)
  assert run.tokenizer.files == built.files
  # Params are the checkpoint's, whichever spelling of the path is given.
  by_step_dir = runs.load_run(os.path.join(tiny_run, "checkpoints", "4"))
  a, b = _flat(run.params), _flat(by_step_dir.params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  model = run.build_model()
  np.testing.assert_array_equal(np.asarray(model.embed[...]), a["embed"])


def test_load_onto_a_mesh(tiny_run):
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
  run = runs.load_run(tiny_run, mesh=mesh)
  kernel = run.params["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_errors_name_the_problem(tiny_run, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no Orbax checkpoint of step 3 \(have \[.*4\]\)"):
    runs.load_run(tiny_run, step=3)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="not a run"):
    runs.load_run(str(tmp_path / "empty"))
  # A checkpoint without the model/tokenizer items (written before runs described
  # themselves) is refused with the reason, not half-loaded.
  legacy = tmp_path / "legacy"
  shutil.copytree(tiny_run, legacy)
  for item in ("model", "tokenizer"):
    shutil.rmtree(legacy / "checkpoints" / "4" / item)
  with pytest.raises(ValueError, match="self-describing"):
    runs.load_run(str(legacy))


def test_model_overrides_apply(tiny_run):
  run = runs.describe_run(tiny_run, model_overrides={"dtype": "bfloat16"})
  assert run.cfg.dtype == "bfloat16" and run.params is None  # describe reads no tensor
