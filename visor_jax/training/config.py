"""The training config: every field with its default and meaning, shared by configs/*.py.

Config files in `configs/` start from `default()` and override; `get_config(arg)` takes
`:key=value` variants (see `config_lib.parse_arg`). Budgets are written as `budgets.py`
describes (a list of SA-layer lists, 'default', 'maximal', '[];[4];[1,4]' or a feasible.json
path) and checked against the model's SA candidates before anything compiles.
"""
from __future__ import annotations

import ml_collections

from visor_jax import model_configs
from visor_jax.data import curriculum
from visor_jax.sharding import DEFAULT_RULES

# Parameter groups (regex over dotted parameter paths, first match wins; see optim.py).
NEW_PARTS = r"decoder\.(cross|pos_conv)\..*"
GROUPS_STAGE1 = [(NEW_PARTS, "new"), (r".*", "frozen")]
GROUPS_ALL = [(r"vision\..*", "vision"), (NEW_PARTS, "new"), (r".*", "llm")]


def default(model: str = "small") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Multi-host (visor_jax/distributed.py): distributed=True auto-detects a TPU pod slice or a
  # SLURM job; or name the coordinator "host:port", the process count and this process's id
  # (else $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID). Unset: one process.
  c.distributed = False
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  c.model = model_configs.get(model)
  # Where weights start when the run has no checkpoint of its own: '' (scratch), a
  # transformers LLaVA-OV directory, or another run's workdir / Orbax checkpoint.
  c.init_from = ""
  # 'synthetic' builds the embedded tokenizer; otherwise a directory with tokenizer.json
  # (defaults to init_from when that is a transformers directory).
  c.tokenizer = "synthetic"

  c.data = ml_collections.ConfigDict(dict(
      source="synthetic",           # 'synthetic' | 'pages' | 'json'
      json_path="",                 # LLaVA-format .json/.jsonl (source='json')
      image_root="",                # image paths in the JSON are relative to this
      eval_json_path="",            # optional validation file for source='json'
                                    # (teacher-forced eval metrics)
      eval_questions="",            # question file (JSONL, see evaluation/harness.py) for
                                    # the end-of-run accuracy of a source='json' run
      synthetic_dir="",             # '' → <workdir>/synthetic_data
      synthetic_seed=0,
      synthetic_sizes=dict(train=1000, validation=96, test=96),
      synthetic_min_side=768,
      synthetic_max_side=1536,
      pages_grid=8,                 # source='pages': cells per page side (data/pages.py);
                                    # 8 matches model 'pages' (73 visual tokens)
      pages_read_turn=False,        # source='pages': half the train records start with
                                    # "Read the page." (every cell supervised)
      pages_turns=1,                # source='pages': questions per train record (more
                                    # supervision per image; see data/pages.py)
      pages_readout=False,          # source='pages': 1 x 1 pages, one coloured digit each
                                    # (learn to read a visual token first; the readout stage)
      pages_families="",            # source='pages': train on these families only ('fine' or
                                    # 'fine,coarse'; '' all): the reproduction's lookup stage
      pages_white_digits=0,         # source='pages': > 0 keeps that many white digits per
                                    # page (the relation curriculum; pages.sparse_layout)
      pages_curriculum="",          # source='pages': train phases read in order, e.g.
                                    # 'readout:200,fine:500,all/4:250,all:400'; must span
                                    # num_steps (data/curriculum.py); '' = one build
      batch_size=8,                 # per host
      text_buckets=(128,),          # static text lengths; each batch uses one
      max_visual=0,                 # 0 → the model's largest AnyRes token count
      max_crops=0,                  # 0 → the model's largest crop count
      max_text_len=128,
      overlong="truncate",          # text past max_text_len: 'truncate' (counted as
                                    # data/truncated) | 'skip' (bad sample 'too_long')
      num_workers=0,                # grain worker processes (0: in-process)
      shuffle_seed=0,
      max_bad_fraction=0.2,         # stop if more of the samples seen are bad
      system_prompt="You are a helpful assistant.",
  ))

  # Universal training: each step samples one feasible budget (a set of SA layers) with
  # these weights. 'default' → `budgets.default_feasible`: 0, 1, 2, 4, ... and all SA
  # candidates spread over the candidate list; or a feasible.json from the budget search.
  c.budgets = "default"
  # VISOR-TR: 0.5 / 0.25 pool the visual tokens 2x / 4x before VISOR's layers, in training and
  # in the teacher-forced eval (1.0: off). The end-of-run table evaluates the plain model;
  # `evaluation.main --reduction=visor_tr:0.5` evaluates the reduced one.
  c.visor_tr_keep = 1.0
  c.budget_weights = None           # None → uniform
  c.eval_budgets = ""               # "" → the training budgets

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=20, end_lr_frac=0.1, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,             # the paper: AdamW without weight decay
      clip_norm=1.0,
      param_groups=GROUPS_ALL,
      lr_mult=dict(),               # {group: multiplier of lr}
  ))
  c.grad_accum = 1
  # The hop loss (training/hop_loss.py): pages data only; weight 0 turns it off. `layers`: the
  # hop is read after layers [0, layers), one past VISOR's first SA candidate.
  c.hop_loss = ml_collections.ConfigDict(dict(weight=0.0, layers=2))
  c.num_steps = 300
  c.log_every = 10
  # Evaluation. At the end: accuracy of generated answers (the evaluation harness) on the
  # first `eval_items` validation items, per budget (0: skipped). Every `eval_every` steps and
  # at the end: teacher-forced exact match and loss on `eval_batches` validation batches.
  c.eval_every = 100                # also every this many steps (0: only at the end)
  c.eval_batches = 12
  c.eval_items = 96
  c.eval_max_new_tokens = 16
  c.ckpt_every = 100
  c.keep_ckpts = 2
  c.async_ckpt = True
  c.nan_policy = "stop"             # 'stop' (error naming the step) | 'skip' (drop the update)

  c.mesh = dict(data=-1, fsdp=1, tensor=1, num_devices=0)  # -1: the remaining devices
  c.sharding_rules = DEFAULT_RULES
  # Plan before paying (training/dry_run.py, docs/dry_run.md): compile the train step with
  # abstract weights for this mesh and the largest batch, print per-device memory, FLOPs,
  # shardings and the step time, and exit: no data, no checkpoint, nothing written.
  c.dry_run = False
  c.dry_run_peak_tflops = 197.0     # peak FLOP/s per device, in TFLOP/s (TPU v5e, bf16)
  c.dry_run_mfu = 0.4               # assumed model FLOPs utilisation for the step-time estimate
  return c


def pages(grid: int = 6, turns: int = 6, read_turn: bool = False) -> ml_collections.ConfigDict:
  """The pages experiment (data/pages.py, docs/pages_dataset.md): model 'pages', source
  'pages', no system prompt, shapes sized to the grid (1 base + grid x (grid + 1) visual
  tokens, 1 + grid^2 crops), `turns` questions per train record (evaluation asks one), and
  optionally the "Read the page." turn on half the train records.

  Grid 6 is the smallest page on which the interaction family still needs SA: vertical
  neighbours are grid + 1 = 7 tokens apart, beyond the positional conv's reach chained
  through the two CA layers (3 x 2 = 6)."""
  c = default("pages")
  d = c.data
  d.source, d.pages_grid, d.pages_turns, d.pages_read_turn = "pages", grid, turns, read_turn
  d.system_prompt = ""
  d.max_visual, d.max_crops = 1 + grid * (grid + 1), 1 + grid * grid
  # One question turn with its template fits 32 text tokens; each extra turn takes ~22
  # (a record past the longest bucket keeps its first turns, counted as truncated).
  longest = 32 + 22 * (turns - 1) + (grid * (grid + 1) + 12 if read_turn else 0)
  d.text_buckets = (32,) if longest <= 32 else (32, min(128, -(-longest // 32) * 32))
  d.max_text_len = d.text_buckets[-1]
  d.batch_size = 16
  d.synthetic_sizes = dict(train=20000, validation=400, test=400)
  c.eval_max_new_tokens = 4           # every answer is one token
  return c


# The default command's curriculum (data/curriculum.py): read digits, find the coloured one,
# then the relations on pages with 1, 2, 4, 8 white digits, then full pages.
DEMO_CURRICULUM = ("readout:200,fine/1:150,fine/2:150,fine/4:150,fine:200,"
                   + ",".join(f"all/{k}@control+interaction:300" for k in (1, 2, 4, 8))
                   + ",all:300")


def pages_demo() -> ml_collections.ConfigDict:
  """The default command (`configs/universal.py` with no arguments): a universal VISOR model
  trained from scratch on the pages dataset in one run, through DEMO_CURRICULUM, with the
  hop loss (training/hop_loss.py) and the default budgets CA-only, SA{4}, SA{1,4} sampled
  1 : 1 : 2 per step (the hop loss only reaches budgets with SA in layers [0, 2)); then the
  accuracy table per family and budget on 400 validation questions (100 per family). About
  9 minutes on 2 CPU cores (README)."""
  c = pages(6, turns=1)
  c.model.visor.hop_head = True
  c.hop_loss.weight = 1.0
  c.budgets = "[];[4];[1,4]"
  c.budget_weights = (1.0, 1.0, 2.0)
  c.data.pages_curriculum = DEMO_CURRICULUM
  c.num_steps = curriculum.total_steps(curriculum.parse(DEMO_CURRICULUM))
  # Train comes from the curriculum's own builds; the full pages' train split only feeds the
  # router (configs/router.py) its pseudo-labels.
  c.data.synthetic_sizes = dict(train=2048, validation=400, test=1600)
  c.eval_items = 400
  c.eval_every = 0
  c.eval_batches = 4
  c.ckpt_every = 500
  c.log_every = 100
  return c


def router(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` plus the router-training settings (method note, "The router")."""
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


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`:model=llava_ov_0_5b,steps=...` style variants shared by the config files."""
  from visor_jax.config_lib import parse_arg
  v = parse_arg(arg, model="", steps=0, batch=0, init_from="", source="")
  if v.model:
    c.model = model_configs.get(v.model)
  if v.steps:
    c.num_steps = v.steps
  if v.batch:
    c.data.batch_size = v.batch
  if v.init_from:
    c.init_from = v.init_from
  if v.source:
    c.data.source = v.source
  return c
