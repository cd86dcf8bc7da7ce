"""Entry point: `python -m visor_jax.main --config=configs/universal.py --workdir=DIR`.

The config file decides what runs (its `get_config(arg)` takes `:key=value` variants); with no
arguments the default config trains a small VISOR model on the embedded synthetic data on CPU
and prints an eval table.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/universal.py", "Experiment config file.",
                                lock_config=False)
flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the synthetic data go here.")


def main(argv):
  del argv
  from visor_jax import train  # after flag parsing: grain workers re-import this module
  logging.getLogger().setLevel(logging.WARNING)   # libraries: warnings only
  logging.getLogger("visor_jax").setLevel(logging.INFO)
  train.main(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
