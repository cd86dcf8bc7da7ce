"""Train-step memory vs visual tokens: does any temporary grow as T² per layer?

    python -m visor_jax.benchmarks.train_memory [--visual=3686,7371] [--devices=8]

Compiles (never runs) the real train step through the dry run (`training/dry_run.py`) at
LLaVA-OV 0.5B geometry, one sample per device on `--devices` fake CPU devices (FSDP), every
parameter trained, bf16 compute, and prints `compiled.memory_analysis()`'s per-device
temporaries for each attention implementation, with and without `model.remat`, at each visual
token count. Doubling the tokens doubles a linear term and quadruples a T² one: the last
column is the ratio of each row's temporaries to the first visual count's.
Numbers are XLA:CPU's buffer assignment (an estimate of an accelerator's, not a measurement).
"""
import jax
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("visual", ["3686", "7371"], "Visual tokens (7,371: 10 crops' worth).")
flags.DEFINE_integer("devices", 8, "Fake CPU devices; one sample and one FSDP shard each.")
flags.DEFINE_integer("crops", 10, "Crops per sample (SigLIP's share of the activations).")
flags.DEFINE_integer("text", 256, "Text tokens per sample.")
flags.DEFINE_list("impls", ["xla", "blockwise"], "attention_impl values to compare.")
flags.DEFINE_list("remat", ["0", "1"], "model.remat values to compare.")

GIB = 2**30


def plan_config(impl: str, remat: bool, visual: int):
  from visor_jax.training import config as train_config
  # configs/universal.py at 0.5B: every parameter trained, the default budgets.
  c = train_config.apply_variant(train_config.default("small"),
                                 f"model=llava_ov_0_5b,batch={FLAGS.devices}")
  c.mesh.update(data=1, fsdp=FLAGS.devices, tensor=1, num_devices=FLAGS.devices)
  c.data.text_buckets = (FLAGS.text,)
  c.data.max_text_len = FLAGS.text
  c.data.max_crops, c.data.max_visual = FLAGS.crops, visual
  c.model.dtype = "bfloat16"
  c.model.attention_impl, c.model.remat = impl, remat
  return c


def main(_):
  jax.config.update("jax_num_cpu_devices", FLAGS.devices)  # before any JAX work
  from visor_jax.benchmarks import cpu_model
  from visor_jax.training import dry_run
  print(f"train step, LLaVA-OV 0.5B, {FLAGS.devices} fake CPU devices (FSDP), 1 sample/device, "
        f"{FLAGS.crops} crops + {FLAGS.text} text tokens, bf16; CPU: {cpu_model()}")
  print(f"{'attention_impl':>14} | {'remat':>5} | {'visual':>6} | {'temporaries GiB':>15} | "
        f"{'arguments GiB':>13} | {'x first visual':>14}")
  for impl in FLAGS.impls:
    for remat in (r == "1" for r in FLAGS.remat):
      first = None
      for visual in map(int, FLAGS.visual):
        plan = dry_run.make_plan(plan_config(impl, remat, visual))
        temps = plan.memory["temporaries"]
        first = first or temps
        print(f"{impl:>14} | {str(remat):>5} | {visual:>6} | {temps / GIB:15.2f} | "
              f"{plan.memory['arguments'] / GIB:13.2f} | {temps / first:14.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
