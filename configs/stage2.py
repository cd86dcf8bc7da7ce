r"""Stage 2: train everything (LLaVA-OV's rates: 1e-5 LLM, 2e-6 vision tower; new parts 1e-4),
maximal configuration, starting from the stage-1 run.

  python -m visor_jax.main --workdir=/tmp/visor_stage2 \
    --config=configs/stage2.py:model=llava_ov_0_5b,source=json,steps=25000,batch=128,init_from=/tmp/visor_stage1 \
    --config.data.json_path=/data/llava_ov_si.jsonl --config.data.image_root=/data/img

`init_from` goes in the variant: the rates below are chosen from it here, before any
`--config.*` flag applies (a `--config.init_from=` flag would keep the from-scratch 1e-3 for
everything). With no arguments it runs the same recipe on the small model and synthetic data
(CPU).
"""
from visor_jax.training import config as train_config


def get_config(arg=None):
  c = train_config.default("small")
  c = train_config.apply_variant(c, arg)
  c.optim.param_groups = train_config.GROUPS_ALL
  c.optim.lr = 1e-5 if c.init_from else 1e-3
  c.optim.lr_mult = dict(vision=0.2, new=10.0, llm=1.0) if c.init_from else dict()
  c.budgets = "maximal"  # all SA candidates on
  return c
