r"""Export a training run's Orbax checkpoint to a directory PyTorch loads.

  python -m visor_jax.export --checkpoint=/tmp/visor_universal --out=/tmp/visor_universal_pt \
      [--dtype=float32|bfloat16] [--tokenizer=<dir with tokenizer.json>] [--max_shard_size=5GB]

`--checkpoint` is a run's workdir, its `checkpoints/` directory (latest step) or one step
directory. The model geometry comes from the config saved with the checkpoint; the params are
restored onto this host's CPU (one copy) and written tensor by tensor, shard by shard. The
output is described in `visor_jax/convert/torch_export.py`; load it with
`visor_jax.convert.torch_model.VisorForConditionalGeneration.from_pretrained(out)` (or, for a
model without VISOR parts, with transformers' `LlavaOnevisionForConditionalGeneration`).
"""
from __future__ import annotations

import logging
import os
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Run workdir, its checkpoints/ dir, or a step dir.")
flags.DEFINE_string("out", None, "Output directory (created).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored tensor dtype.")
flags.DEFINE_string("tokenizer", None, "Directory with tokenizer.json; default: the run's "
                    "<workdir>/tokenizer, else its config.tokenizer / config.init_from, else "
                    "the rebuilt synthetic tokenizer.")
flags.DEFINE_string("max_shard_size", "5GB", "Shard the safetensors past this size.")


def resolve_step(path: str) -> tuple[str, int]:
  """workdir | checkpoints dir | step dir → (checkpoints dir, step: the given or the latest)."""
  from visor_jax import checkpoints
  directory, step = checkpoints.checkpoint_dir(path)
  if step is None:
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
        directory) else []
    if not steps:
      raise FileNotFoundError(f"--checkpoint={path}: no Orbax checkpoint step found.")
    step = max(steps)
  return directory, step


def run_tokenizer_dir(config, workdir: str) -> str | None:
  """The run's tokenizer directory, as serving finds it: <workdir>/tokenizer (the trainer saves
  the synthetic one there), else config.tokenizer, else a transformers init_from."""
  for d in (os.path.join(workdir, "tokenizer"), config.get("tokenizer"), config.get("init_from")):
    if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
      return d
  return None


def restore_params(step_dir: str, cfg) -> dict:
  """Params only, restored onto one CPU device whatever mesh wrote them (one host copy)."""
  import jax
  from flax import nnx
  from visor_jax import checkpoints
  from visor_jax.models.llava_onevision import LlavaOnevision
  abstract = nnx.state(nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0))),
                       nnx.Param).to_pure_dict()
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                          abstract)
  return checkpoints.restore_params_from(step_dir, abstract)


def export(checkpoint: str, out: str, dtype: str = "float32", tokenizer: str | None = None,
           max_shard_size: str = "5GB") -> list[str]:
  """The CLI as a function; returns the safetensors files written.

  The model geometry is the one the trainer built (`train_data.model_and_tokenizer` on the
  config saved with the checkpoint), so the restored params fit it by construction.
  """
  from visor_jax import checkpoints, config_lib, train_data
  from visor_jax.convert import torch_export
  directory, step = resolve_step(checkpoint)
  step_dir = os.path.join(directory, str(step))
  config, _ = checkpoints.read_run_config(step_dir)
  config.unlock()
  tok_dir = tokenizer or run_tokenizer_dir(config, os.path.dirname(directory))
  if tok_dir:
    config.tokenizer = tok_dir
  with tempfile.TemporaryDirectory() as scratch:  # a rebuilt synthetic tokenizer lands here
    model_dict, tok = train_data.model_and_tokenizer(config, scratch)
  cfg = config_lib.model_config(model_dict)
  try:
    params = restore_params(step_dir, cfg)
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"{step_dir}: the checkpoint's params do not fit the model built from its saved config "
        f"(geometry from config.model, or from init_from={config.get('init_from')!r}'s "
        f"config.json when that directory exists on this machine): {e}") from e
  files = torch_export.export_params(params, cfg, out, dtype, tokenizer_dir=tok_dir,
                                     max_shard_bytes=torch_export.parse_size(max_shard_size))
  if not tok_dir:
    tok.save(out)  # the rebuilt synthetic tokenizer (tokenizer.json)
  kind = "VISOR" if torch_export.has_visor_parts(cfg) else "plain LLaVA-OV"
  print(f"exported step {step} of {directory} ({kind}, {dtype}) to {out}: {', '.join(files)}")
  return files


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required.")
  logging.getLogger().setLevel(logging.WARNING)   # libraries (orbax): warnings only
  export(FLAGS.checkpoint, FLAGS.out, FLAGS.dtype, FLAGS.tokenizer, FLAGS.max_shard_size)


if __name__ == "__main__":
  app.run(main)
