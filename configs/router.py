r"""Router training on a trained universal run (method note, "The router"): pseudo-labels
(cheapest feasible budget reaching 99% of the full budget's score), then the router MLP with
cross-entropy, LVLM frozen. Writes a run directory with the router added.

  python -m visor_jax.main --config=configs/router.py --workdir=/tmp/visor_router \
    --config.router_train.from_workdir=/tmp/visor_universal

`feasible` may name a feasible.json written by the budget search (python -m
visor_jax.evaluation.main --mode=search), checked against the model's SA candidates; by default
the universal run's training budgets are used.
"""
import ml_collections

from visor_jax.training import config as train_config


def get_config(arg=None):
  c = train_config.default("small")
  c = train_config.apply_variant(c, arg)
  c.router_train = ml_collections.ConfigDict(dict(
      from_workdir="",        # the universal run (an Orbax workdir)
      feasible="",            # feasible.json from the budget search ('' = the run's budgets)
      split="train",          # where pseudo-labels come from
      num_samples=512,
      score="likelihood",     # 'likelihood' (geometric-mean answer-token prob) | 'correct'
      ratio=0.99,             # a budget is enough if it reaches 99% of the full budget's score
      hidden=256, threshold=0.5,
      epochs=60, lr=1e-3, batch_size=64,
  ))
  return c
