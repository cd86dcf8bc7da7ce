"""Shared test setup: fake devices, a persistent compilation cache, shared tiny fixtures.

Speed: the suite compiles the same tiny programs many times (every trainer run builds its own
jitted step). A persistent compilation cache shared by this process and the subprocesses it
starts turns each repeat into a cache hit; it holds compiled executables keyed by the program
and the XLA flags, so numerics are exactly those of a fresh compile.
"""
import os
import sys
import tempfile

# Fake CPU devices for mesh tests, and fast compiles (XLA's backend optimisations cost more
# than they save on tiny programs; numerics are compared under the same flags everywhere).
# Must be set before JAX initialises.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "visor_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Grain reads absl flags in its workers; tests run without absl's app.run.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cfg():
  """The tiny model geometry (tests/hf_fixtures.py builds transformers models from it)."""
  from visor_jax import config_lib, model_configs
  return config_lib.model_config(model_configs.tiny())


@pytest.fixture(scope="session")
def tok():
  import hf_fixtures
  return hf_fixtures.tiny_tokenizer()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  """The tiny synthetic dataset of `train_fixtures.SYNTHETIC`, built once."""
  import train_fixtures as tf
  from visor_jax.data import synthetic
  d = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.build(d, seed=0, sizes=tf.SYNTHETIC["synthetic_sizes"],
                  min_side=tf.SYNTHETIC["synthetic_min_side"],
                  max_side=tf.SYNTHETIC["synthetic_max_side"])
  return d


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_dir):
  """One finished tiny training run (4 steps, a checkpoint at 4, its end-of-run evaluation on
  4 validation items), shared read-only by the loading, restore, router and evaluation tests.
  Tests that continue it copy it first."""
  import train_fixtures as tf
  from visor_jax.training import train
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  train.main(tf.tiny_config(synthetic_dir, num_steps=4, ckpt_every=4), workdir)
  return workdir
