r"""Export a run to a directory PyTorch loads.

  python -m visor_jax.export --checkpoint=/tmp/visor_universal --out=/tmp/visor_universal_pt \
      [--step=N] [--dtype=float32|bfloat16] [--tokenizer=<dir>] [--max_shard_size=5GB]

`--checkpoint` is anything `runs.load_run` reads: a run's workdir (latest step, or `--step`),
its `checkpoints/` directory or one step directory (or a transformers / exported directory, to
re-export it). The model geometry and tokenizer are the ones saved with the checkpoint; the
params are restored onto this host's first device (one copy) and written tensor by tensor,
shard by shard. The output is described in `visor_jax/convert/torch_export.py`; load it with
`visor_jax.convert.torch_model.VisorForConditionalGeneration.from_pretrained(out)` (or, for a
model without VISOR parts, with transformers' `LlavaOnevisionForConditionalGeneration`).
"""
from __future__ import annotations

import logging

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Run workdir, its checkpoints/ dir, or a step dir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("out", None, "Output directory (created).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored tensor dtype.")
flags.DEFINE_string("tokenizer", None, "Directory whose tokenizer files to ship instead of "
                    "the run's own (the tokenizer saved with its checkpoint).")
flags.DEFINE_string("max_shard_size", "5GB", "Shard the safetensors past this size.")


def export(checkpoint: str, out: str, dtype: str = "float32", tokenizer: str | None = None,
           max_shard_size: str = "5GB", step: int | None = None) -> list[str]:
  """The CLI as a function; returns the safetensors files written."""
  from visor_jax import runs
  from visor_jax.convert import torch_export
  run = runs.load_run(checkpoint, step)
  files = torch_export.export_params(run.params, run.cfg, out, dtype, tokenizer_dir=tokenizer,
                                     max_shard_bytes=torch_export.parse_size(max_shard_size),
                                     image_spec=run.image_spec)
  if not tokenizer:
    run.tokenizer.save(out)  # every tokenizer file the run carries
  kind = "VISOR" if torch_export.has_visor_parts(run.cfg) else "plain LLaVA-OV"
  where = f"step {run.step} of {run.path}" if run.step is not None else run.path
  print(f"exported {where} ({kind}, {dtype}) to {out}: {', '.join(files)}")
  return files


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required.")
  logging.getLogger().setLevel(logging.WARNING)   # libraries (orbax): warnings only
  export(FLAGS.checkpoint, FLAGS.out, FLAGS.dtype, FLAGS.tokenizer, FLAGS.max_shard_size,
         FLAGS.step)


if __name__ == "__main__":
  app.run(main)
