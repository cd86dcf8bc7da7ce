r"""Universal VISOR training: every step samples one feasible budget (set of SA layers).

Default (no arguments): a small model trained from scratch on the embedded synthetic
fine-grained VQA data, on CPU, in a few minutes; ends with an eval table (accuracy per
question family and FLOPs per budget):

  python -m visor_jax.main --config=configs/universal.py --workdir=/tmp/visor_universal

Real recipe (after stage 1 and stage 2, see README): LLaVA-OV 0.5B, LLaVA-format data:

  python -m visor_jax.main --workdir=gs://.../universal \
    --config=configs/universal.py:model=llava_ov_0_5b,source=json,steps=20000,batch=128 \
    --config.init_from=gs://.../stage2 \
    --config.data.json_path=/data/llava_ov_si.jsonl --config.data.image_root=/data/images
"""
from visor_jax.training import config as train_config


def get_config(arg=None):
  c = train_config.default("small")
  return train_config.apply_variant(c, arg)
