"""Entry point: `python -m visor_jax.main --config=configs/universal.py --workdir=DIR`.

The config file decides what runs: training (`training/train.py`), or router training
(`training/router_train.py`) for configs/router.py. Its `get_config(arg)` takes `:key=value`
variants. With no arguments the default config trains a small VISOR model on the embedded
synthetic data on CPU and prints the evaluation table.
"""
import logging

from absl import app, flags
from ml_collections import config_flags


def define_flags(fv, argv=None) -> None:
  """The command's flags, on `fv` (absl's global FLAGS when run as a command; a fresh
  `FlagValues` lets a test parse a README command line in process without claiming the
  global names `config` / `workdir`, which other entry points define too). `argv`: the
  command line `fv` will parse, when it is not sys.argv (ml_collections reads the
  `--config.*` overrides from it)."""
  config_flags.DEFINE_config_file("config", "configs/universal.py", "Experiment config file.",
                                  lock_config=False, flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the synthetic data go "
                      "here.", flag_values=fv)


def run(config, workdir: str):
  """What the config names: router training (configs/router.py) or training; returns its
  result (`router_train.main`'s stats, `train.main`'s result)."""
  # Imported after flag parsing: grain workers re-import these modules.
  if "router_train" in config:  # configs/router.py
    from visor_jax.training import router_train
    return router_train.main(config, workdir)
  from visor_jax.training import train
  return train.main(config, workdir)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)   # libraries: warnings only
  logging.getLogger("visor_jax").setLevel(logging.INFO)
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(main)
