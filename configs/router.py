r"""Router training on a trained universal run (method note, "The router"): pseudo-labels
(cheapest feasible budget reaching 99% of the full budget's score), then the router MLP with
cross-entropy, LVLM frozen. Writes a run directory with the router added.

  python -m visor_jax.main --config=configs/router.py --workdir=/tmp/visor_router \
    --config.router_train.from_workdir=/tmp/visor_universal

`feasible` may name a feasible.json written by the budget search (python -m
visor_jax.evaluation.main --mode=search), checked against the model's SA candidates; by default
the universal run's training budgets are used.
"""
from visor_jax.training import config as train_config


def get_config(arg=None):
  c = train_config.default("small")
  return train_config.router(train_config.apply_variant(c, arg))
