"""Model geometry model_configs.llava_ov_7b(), for the analytic tools (no data or training).

Run: python -m visor_jax.flops --config=configs/llava_ov_7b.py
Variants: --config=configs/llava_ov_7b.py:dtype=bfloat16
"""
import ml_collections

from visor_jax import config_lib, model_configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, dtype="float32")
  model = model_configs.llava_ov_7b()
  model.dtype = args.dtype
  return ml_collections.ConfigDict(dict(model=model))
