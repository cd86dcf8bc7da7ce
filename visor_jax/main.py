"""Entry point: `python -m visor_jax.main --config=configs/universal.py --workdir=DIR`.

The config file decides what runs: training (`training/train.py`), or router training
(`training/router_train.py`) for configs/router.py. Its `get_config(arg)` takes `:key=value`
variants. With no arguments the default config trains a small VISOR model on the embedded
synthetic data on CPU and prints the evaluation table.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/universal.py", "Experiment config file.",
                                lock_config=False)
flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the synthetic data go here.")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)   # libraries: warnings only
  logging.getLogger("visor_jax").setLevel(logging.INFO)
  config = flags.FLAGS.config
  # Imported after flag parsing: grain workers re-import these modules.
  if "router_train" in config:  # configs/router.py
    from visor_jax.training import router_train
    router_train.main(config, flags.FLAGS.workdir)
  else:
    from visor_jax.training import train
    train.main(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
