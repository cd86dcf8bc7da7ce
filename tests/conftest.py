import os
import sys

# Fake CPU devices for mesh tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Grain reads absl flags in its workers; tests run without absl's app.run.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


# Shared fixtures: the tiny model geometry and the tiny tokenizer (tests/hf_fixtures.py).
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cfg():
  from visor_jax import config_lib, model_configs
  return config_lib.model_config(model_configs.tiny())


@pytest.fixture(scope="session")
def tok():
  import hf_fixtures
  return hf_fixtures.tiny_tokenizer()
