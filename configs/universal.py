r"""Universal VISOR training: every step samples one feasible budget (set of SA layers).

Default (no arguments): VISOR trained from scratch on the embedded pages dataset through a
curriculum (1 x 1 pages, the coloured digit, relations on sparse pages, full pages; see
`training.config.pages_demo`), on CPU, in about 9 minutes; ends with the eval table (accuracy
per question family and budget with 95% intervals, FLOPs per budget):

  python -m visor_jax.main --config=configs/universal.py --workdir=/tmp/visor_universal

A `model=` or `source=` variant starts from the plain defaults instead (`model=small`: the small
model on the embedded synthetic scenes). Real recipe (after stage 1 and stage 2, see README):
LLaVA-OV 0.5B, LLaVA-format data:

  python -m visor_jax.main --workdir=gs://.../universal \
    --config=configs/universal.py:model=llava_ov_0_5b,source=json,steps=20000,batch=128 \
    --config.init_from=gs://.../stage2 \
    --config.data.json_path=/data/llava_ov_si.jsonl --config.data.image_root=/data/images
"""
from visor_jax.config_lib import parse_arg
from visor_jax.training import config as train_config


def get_config(arg=None):
  v = parse_arg(arg, model="", steps=0, batch=0, init_from="", source="")
  c = train_config.default("small") if v.model or v.source else train_config.pages_demo()
  return train_config.apply_variant(c, arg)
