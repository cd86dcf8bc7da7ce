"""Entry point: `python -m visor_jax.main --config=configs/universal.py --workdir=DIR`.

The config file decides what runs: training (`training/train.py`), or router training
(`training/router_train.py`) for configs/router.py. Its `get_config(arg)` takes `:key=value`
variants. With no arguments the default config trains a small VISOR model on the embedded
pages dataset through its curriculum on CPU and prints the evaluation table.

Also the package's console scripts (pyproject.toml): `visor-train` is this command,
`visor-eval`, `visor-serve`, `visor-reproduce`, `visor-export`, `visor-flops` and
`visor-tiny-checkpoint` run their modules as `python -m` does. A `--config=configs/...` that
does not exist in the working directory is read from the installed package's copy.
"""
import logging
import re
import runpy
import sys
import warnings

from absl import app, flags
from ml_collections import config_flags

from visor_jax import config_lib


def define_flags(fv, argv=None) -> None:
  """The command's flags, on `fv` (absl's global FLAGS when run as a command; a fresh
  `FlagValues` lets a test parse a README command line in process without claiming the
  global names `config` / `workdir`, which other entry points define too). `argv`: the
  command line `fv` will parse, when it is not sys.argv (ml_collections reads the
  `--config.*` overrides from it)."""
  config_flags.DEFINE_config_file("config", config_lib.resolve_config_path(
      "configs/universal.py"), "Experiment config file.",
                                  lock_config=False, flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the synthetic data go "
                      "here.", flag_values=fv)


def run(config, workdir: str):
  """What the config names: a dry run (`dry_run=True`), router training (configs/router.py)
  or training; returns its result (`dry_run.main`'s plan, `router_train.main`'s stats,
  `train.main`'s result)."""
  # Imported after flag parsing: grain workers re-import these modules.
  if config.get("dry_run"):  # plan before paying: compile, report, exit (docs/dry_run.md)
    from visor_jax.training import dry_run
    return dry_run.main(config)
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


def resolve_config_flag(argv: list[str], default: str | None = None) -> list[str]:
  """`argv` with its `--config` value found by `config_lib.resolve_config_path` (so an
  installed package runs `--config=configs/universal.py:model=tiny` from any directory);
  without one, `--config=<default, resolved>` goes first when `default` is given and is not
  in the working directory. `--config.x=y` overrides pass through untouched."""
  out = list(argv)
  for i, arg in enumerate(out[1:], 1):
    m = re.fullmatch(r"(--?config=)(.*)", arg, re.S)
    if m:
      out[i] = m.group(1) + config_lib.resolve_config_path(m.group(2))
      return out
    if re.fullmatch(r"--?config", arg) and i + 1 < len(out):
      out[i + 1] = config_lib.resolve_config_path(out[i + 1])
      return out
  if default and config_lib.resolve_config_path(default) != default:
    out.insert(1, f"--config={config_lib.resolve_config_path(default)}")
  return out


# ---------------------------------------------------------------------------------------------
# Console scripts (pyproject.toml [project.scripts]).

def _run_module(module: str, default_config: str | None = None) -> None:
  # runpy runs the module's own `if __name__ == "__main__":` block: the console script is
  # exactly `python -m module`, whatever flags the module defines (and absl's --help lists
  # them, as it lists the flags of the __main__ module).
  sys.argv = resolve_config_flag(sys.argv, default_config)
  with warnings.catch_warnings():
    # `visor-train` imported this module to call train(); like `python -m`, runpy then runs
    # a fresh copy as __main__ (harmless: importing this module defines nothing global).
    warnings.filterwarnings("ignore", r".* found in sys.modules", RuntimeWarning)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
  """`visor-train`: python -m visor_jax.main."""
  _run_module("visor_jax.main")


def evaluate() -> None:
  """`visor-eval`: python -m visor_jax.evaluation.main."""
  _run_module("visor_jax.evaluation.main")


def serve() -> None:
  """`visor-serve`: python -m visor_jax.inference.serving."""
  _run_module("visor_jax.inference.serving")


def reproduce() -> None:
  """`visor-reproduce`: python -m visor_jax.reproduce (default --config=configs/reproduce.py)."""
  _run_module("visor_jax.reproduce", default_config="configs/reproduce.py")


def export() -> None:
  """`visor-export`: python -m visor_jax.export."""
  _run_module("visor_jax.export")


def flops() -> None:
  """`visor-flops`: python -m visor_jax.flops."""
  _run_module("visor_jax.flops")


def tiny_checkpoint() -> None:
  """`visor-tiny-checkpoint`: python -m visor_jax.convert.tiny_checkpoint."""
  _run_module("visor_jax.convert.tiny_checkpoint")


if __name__ == "__main__":
  sys.argv = resolve_config_flag(sys.argv)
  define_flags(flags.FLAGS)
  app.run(main)
