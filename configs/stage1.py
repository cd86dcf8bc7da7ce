r"""Stage 1: train only VISOR's new parts (cross-attention, positional conv) on top of a
frozen LLaVA-OV, with the maximal configuration (all SA candidates on).

  python -m visor_jax.main --workdir=/tmp/visor_stage1 \
    --config=configs/stage1.py:model=llava_ov_0_5b,source=json,steps=30000,batch=128,init_from=/models/llava-onevision-qwen2-0.5b-ov-hf \
    --config.data.json_path=/data/llava_ov_stage1_5.jsonl --config.data.image_root=/data/img

`init_from` goes in the variant: the learning rate below is chosen from it here, before any
`--config.*` flag applies (a `--config.init_from=` flag would keep the from-scratch 1e-3).
With no arguments it runs the same recipe on the small model and synthetic data (CPU).
"""
from visor_jax.training import config as train_config


def get_config(arg=None):
  c = train_config.default("small")
  c = train_config.apply_variant(c, arg)
  c.optim.param_groups = train_config.GROUPS_STAGE1  # everything else frozen
  c.optim.lr = 1e-4 if c.init_from else 1e-3
  c.budgets = "maximal"  # all SA candidates on
  c.eval_budgets = ""
  return c
