"""One command from nothing to the paper-style table on the pages dataset.

  python -m visor_jax.reproduce --config=configs/reproduce.py --workdir=/tmp/visor_repro

Stages, each a directory under the workdir (a finished stage has a DONE file and is skipped on a
rerun; an interrupted training stage resumes from its own checkpoint):

  readout/    from scratch, every layer self-attends, on 1 x 1 pages (one coloured digit):
              the LLM learns to read a digit from a visual token (pages.readout_example)
  lookup/     the same model, `fine` questions only, on pages with 1, 2, 4 white digits, then
              full pages: it learns to find the one coloured digit among ~30 white ones (with
              the other families mixed in, or on full pages at once, it did not reliably)
  relations_1/, _2/, _4/, _8/  every family, the relation questions on sparse pages with 1, 2,
              4, 8 white digits, with the hop loss (training/hop_loss.py): the relation
              curriculum, without which the relation families never left chance
  base/       the LLaVA-OV-style model: every layer self-attends (budget 'all'), from lookup/
  stage1/     VISOR's new parts only (cross-attention, positional conv), maximal budget
  stage2/     everything, maximal budget
  universal/  every default feasible budget, sampled per step
  search/     every SA subset on validation items -> feasible.json (the Pareto frontier)
  router/     the router on pseudo-labels over the feasible budgets
  visor_tr_50/, visor_tr_25/  the universal model fine-tuned with its visual tokens pooled 2x / 4x
  evaluate/   every method on the test split, the controls; then results/ (evaluation/report.py)

The stages share one copy of the data (<workdir>/data; with a gs:// workdir, the local data
cache `sources.LOCAL_DATA_CACHE`: see docs/storage.md). What each step means and why: see
docs/reproduce.md.
"""
from __future__ import annotations

import collections
import logging
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from visor_jax import budgets as budgets_lib
from visor_jax import paths, runs
from visor_jax.data import curriculum, inputs, pages, pages_build, sources
from visor_jax.data.conversations import ImageLoader
from visor_jax.evaluation import harness, report
from visor_jax.evaluation import main as eval_main
from visor_jax.inference import serving
from visor_jax.models import token_reduction as tr
from visor_jax.training import config as train_config
from visor_jax.training import router_train, train

log = logging.getLogger(__name__)
DONE = "DONE"
CHANCE_DIGIT = 0.1


# ---------------------------------------------------------------------------------------------
# Stage configs.

def stage_config(rc: ml_collections.ConfigDict, stage: str, workdir: str
                 ) -> ml_collections.ConfigDict:
  """The training config of one stage (`training.config.pages` plus the stage's settings)."""
  # lookup: one fine question per record (extra turns would bring the other families back).
  c = train_config.pages(rc.grid, turns=1 if stage == "lookup" else rc.turns)
  c.seed = rc.seed
  # The hop loss's head exists from the first stage on (later stages inherit the model).
  c.model.visor.hop_head = True
  c.data.batch_size = rc.batch
  c.data.synthetic_sizes = dict(rc.sizes)
  c.data.synthetic_dir = data_dir(workdir)
  kind = stage.rsplit("_", 1)[0] if stage.startswith(("visor_tr_", "relations_")) else stage
  c.num_steps = (curriculum.total_steps(curriculum.parse(rc.lookup)) if kind == "lookup"
                 else rc.steps[kind])
  c.optim.lr = rc.lr[kind]
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, c.num_steps // 10))
  c.ckpt_every = max(1, min(200, c.num_steps))
  c.eval_items = 0                     # the evaluate stage does the accuracy
  c.eval_batches = 4
  c.log_every = max(1, min(50, c.num_steps))
  if kind in ("readout", "lookup", "relations", "base"):
    c.budgets = "all"
  c.data.pages_readout = stage == "readout"
  # lookup and relations: one-stage curricula (data/curriculum.py). The coloured digit on pages
  # with 1, 2, 4 white digits, then full pages; then every family with only the relation
  # questions on sparse pages (coarse and fine keep full pages, so neither is forgotten).
  if kind == "lookup":
    c.data.pages_curriculum = rc.lookup
  elif kind == "relations":
    white = int(stage.rsplit("_", 1)[1])
    c.data.pages_curriculum = f"all/{white}@control+interaction:{c.num_steps}"
  # The hop loss from the relation curriculum on (not VISOR-TR: its pooled tokens no longer
  # follow the page layout the loss reads).
  if kind not in ("readout", "lookup", "visor_tr"):
    c.hop_loss.weight = rc.hop_weight
  order = training_stages(rc)
  if stage != "readout":
    c.init_from = paths.join(workdir, "universal" if kind == "visor_tr"
                             else order[order.index(stage) - 1])
  if stage == "stage1":
    c.optim.param_groups = train_config.GROUPS_STAGE1
    c.budgets = rc.stage1_budgets
  elif stage == "stage2":
    c.budgets = "maximal"
  elif stage == "universal":
    c.budgets = "default"
  elif kind == "visor_tr":  # the universal model fine-tuned with its visual tokens pooled
    c.budgets = "default"
    c.visor_tr_keep = visor_tr_stages(rc)[stage].keep
  return c


def visor_tr_stages(rc) -> dict[str, tr.Reduction]:
  """The VISOR-TR training stages: name ('visor_tr_50' for keep 0.5) -> its reduction."""
  return {f"visor_tr_{round(r.keep * 100)}": r for r in eval_main._reductions(rc.visor_tr)}


def data_dir(workdir: str) -> str:
  """Where the stages' pages dataset lives: <workdir>/data, or the local data cache for a
  gs:// workdir (array_record files must be local)."""
  return sources.LOCAL_DATA_CACHE if paths.is_remote(workdir) else os.path.join(workdir, "data")


def training_stages(rc) -> tuple[str, ...]:
  """The training stages in order, each starting from the one before."""
  return ("readout", "lookup", *(f"relations_{k}" for k in rc.relations), "base", "stage1",
          "stage2", "universal")


def _stage(workdir: str, name: str, fn: Callable[[str], bool]) -> str:
  """Runs `fn(stage_dir)` unless the stage is DONE (which holds its wall seconds); fn returns
  False when interrupted."""
  d = paths.join(workdir, name)
  if paths.exists(paths.join(d, DONE)):
    log.info("stage %s: done already (%s)", name, d)
    return d
  log.info("stage %s: running in %s", name, d)
  paths.makedirs(d)
  start = time.time()
  if not fn(d):
    raise SystemExit(f"stage {name} was interrupted; rerun the same command to resume it.")
  paths.write_text(paths.join(d, DONE), f"{time.time() - start:.1f}\n")
  return d


def _seconds(workdir: str, name: str) -> float:
  return float(paths.read_text(paths.join(workdir, name, DONE)).strip() or 0)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def _train(config) -> Callable[[str], bool]:
  return lambda d: not train.main(config, d).preempted


# ---------------------------------------------------------------------------------------------
# Items and controls.

def data_params(rc, workdir: str, permute_rows: bool = False) -> dict:
  """The pages build every stage trains on (or its row-permuted test split alone: records are
  a pure function of (seed, split, index), so the other splits need not be built again)."""
  params = sources.pages_params(stage_config(rc, "base", workdir).data)
  if permute_rows:
    params.update(permute_rows=True, sizes={**params["sizes"], "train": 0, "validation": 0})
  return params


def test_items(rc, workdir: str, permute_rows: bool = False) -> list[harness.Item]:
  params = data_params(rc, workdir, permute_rows)
  directory = data_dir(workdir)
  pages_build.build(directory, **params)
  return harness.synthetic_items(directory, "test", dataset="pages", **params)


def _index(item: harness.Item) -> int:
  return int(item.id.rsplit("-", 1)[1])


def families_with_chance(rc, items) -> dict:
  """{family: {kind, chance}}: chance is 1/10 for digits; for coarse items the mean over the
  items of 1 / (number of possible answers to their question)."""
  options = {"page_colour": len(pages.PAGE_COLOURS), "has_block": 2,
             "count_blocks": pages.max_blocks(rc.grid) + 1}
  coarse = [1 / options[it.tags[1]] for it in items if it.group == "coarse"]
  return {f: {"kind": f, "chance": float(np.mean(coarse)) if f == "coarse" and coarse
              else CHANCE_DIGIT} for f in pages.FAMILIES}


def question_only(rc, workdir: str, items) -> dict:
  """The blind baseline: each test question answered with the most frequent train answer to
  the same question text (the image never looked at); a harness-like summary per family."""
  recs = pages_build.records("train", data_dir(workdir), **data_params(rc, workdir))
  answers = collections.defaultdict(collections.Counter)
  for i in range(len(recs)):
    turns = recs[i]["conversations"]
    for human, gpt in zip(turns[::2], turns[1::2]):   # every question turn of the record
      q = human["value"].replace("<image>", "").strip()
      if q != pages.READ_QUESTION:
        answers[q][gpt["value"]] += 1
  per = collections.defaultdict(list)
  for it in items:
    guess = answers[it.question].most_common(1)[0][0] if answers[it.question] else ""
    per[it.group].append(float(guess == it.answers[0]))
  return {"per_group": {g: {"accuracy": float(np.mean(s)), "n": len(s)}
                        for g, s in per.items()}}


def answer_token_kept(assistant: serving.Assistant, rc, items, reduction: tr.Reduction,
                      batch_size: int) -> float:
  """The oracle rate of a token reduction: the fraction of non-coarse test items whose answer
  cell's visual token survived it (ranked at the last prompt token, as when answering); the
  peer's accuracy ceiling on those families."""
  graphdef, state = nnx.split(assistant.model)
  fwd = jax.jit(lambda state, x, rank: tr.reduced_forward(
      nnx.merge(graphdef, state), x, reduction, rank_index=rank).survived)
  loader, kept = ImageLoader(), []
  sel = [it for it in items if it.group != "coarse"]
  for start in range(0, len(sel), batch_size):
    chunk = sel[start:start + batch_size]
    samples = [inputs.build_sample(assistant.prompt_ids(it.question), [loader(it.image)],
                                   assistant.cfg, assistant.spec) for it in chunk]
    samples += samples[:1] * (batch_size - len(samples))  # one compiled shape
    batch = inputs.collate(samples, text_len=max(len(x.tokens) for x in samples),
                           num_visual=max(x.num_visual_tokens for x in samples),
                           num_crops=max(len(x.pixels) for x in samples))
    rank = jnp.asarray(batch["text_valid"].sum(axis=1) - 1)
    survived = np.asarray(fwd(state, batch, rank))
    for row, it in zip(survived, chunk):
      spec = pages.generate_spec(rc.seed, "test", _index(it), rc.grid)
      cell = pages.answer_cell(spec["layout"], spec["question"])
      kept.append(bool(row[pages.visual_token(rc.grid, cell)]))
  return float(np.mean(kept)) if kept else float("nan")


# ---------------------------------------------------------------------------------------------
# The program.

def evaluate_all(rc, workdir: str, out_dir: str, print_fn: Callable = print) -> dict:
  """Every method on the test split, the controls; returns the results (report.py's shape)."""
  items = test_items(rc, workdir)
  families = families_with_chance(rc, items)
  peers = eval_main._reductions(rc.peers)
  kw = dict(batch_size=rc.eval_batch, max_new_tokens=4, print_fn=print_fn)

  # The base model and the token-reduction peers on it.
  base = serving.Assistant(runs.load_run(paths.join(workdir, "base")))
  all_layers = [list(range(base.cfg.num_layers))]
  s_base = eval_main.evaluate(base, items, paths.join(out_dir, "base"), layer_sets=all_layers,
                              reductions=peers, **kw)
  base_row = s_base["runs"][0]
  rows = [report.row("base", "all layers SA", base_row, families, base_row,
                     sa_layers=all_layers[0])]
  for r, red in zip(s_base["runs"][1:], peers):
    rows.append(report.row(red.method, f"keep {red.keep:g}", r, families, base_row,
                           answer_token_kept=answer_token_kept(base, rc, items, red,
                                                               rc.eval_batch)))

  # VISOR: the feasible budgets, the router; VISOR-TR (each ratio its own fine-tuned run).
  visor = serving.Assistant(runs.load_run(paths.join(workdir, "router")))
  fixed = [list(b) for b in budgets_lib.default_feasible(visor.cfg)]
  fixed += [list(b) for b in visor.cfg.router.feasible if list(b) not in fixed]
  s_visor = eval_main.evaluate(visor, items, paths.join(out_dir, "visor"), layer_sets=fixed,
                               router=True, **kw)
  hist = {}
  for r in s_visor["runs"]:
    if r["kind"] == "fixed":
      rows.append(report.row("visor", r["label"], r, families, base_row,
                             sa_layers=r["sa_layers"]))
    elif r["kind"] == "router":
      rows.append(report.row("router", f"threshold {visor.cfg.router.threshold:g}", r,
                             families, base_row))
      hist = report.router_histogram(r, list(families))
  for name, red in visor_tr_stages(rc).items():  # maximal budget, the run tuned at this ratio
    tr_run = serving.Assistant(runs.load_run(paths.join(workdir, name)))
    r, = eval_main.evaluate_reductions(tr_run, items, paths.join(out_dir, name), [red],
                                       batch_size=rc.eval_batch, max_new_tokens=4)
    rows.append(report.row("visor_tr", r["label"] + " (trained)", r, families, base_row,
                           sa_layers=r["sa_layers"]))

  # Controls: the blind baseline; the permuted layout (labels re-derived).
  blind = question_only(rc, workdir, items)
  rows.append({"method": "question_only", "setting": "most frequent train answer",
               "families": report.family_stats(blind, families), "llm_gflops": None,
               "llm_saving": None, "total_saving": None})
  permuted = test_items(rc, workdir, permute_rows=True)
  s_perm = eval_main.evaluate(visor, permuted, paths.join(out_dir, "permuted"),
                              layer_sets=[[], budgets_lib.maximal(visor.cfg)], **kw)
  s_perm_base = eval_main.evaluate(base, permuted, paths.join(out_dir, "permuted_base"),
                                   layer_sets=all_layers, **kw)
  perm_rows = [report.row("base", "all layers SA", s_perm_base["runs"][0], families, base_row)]
  perm_rows += [report.row("visor", r["label"], r, families, base_row, sa_layers=r["sa_layers"])
                for r in s_perm["runs"]]
  return {"families": families, "rows": rows, "router_histogram": hist,
          "permuted_rows": perm_rows}


def search_stage(rc, workdir: str) -> Callable[[str], bool]:
  """Every SA subset of the universal run on validation items → feasible.json."""
  def fn(d):
    eval_main.run(paths.join(workdir, "universal"), d, mode="search",
                  limit=rc.search_items, batch_size=rc.eval_batch, max_new_tokens=4)
    return True
  return fn


def router_stage(rc, workdir: str) -> Callable[[str], bool]:
  def fn(d):
    c = train_config.router(train_config.pages(rc.grid))
    c.seed = rc.seed
    c.router_train.from_workdir = paths.join(workdir, "universal")
    c.router_train.feasible = paths.join(workdir, "search", "feasible.json")
    c.router_train.num_samples = rc.router.num_samples
    c.router_train.epochs = rc.router.epochs
    c.router_train.threshold = rc.router.threshold
    router_train.main(c, d)
    return True
  return fn


def reproduce(rc: ml_collections.ConfigDict, workdir: str, print_fn: Callable = print) -> dict:
  """All stages (skipping finished ones), then results/ under the workdir; returns results."""
  paths.makedirs(workdir)
  for stage in training_stages(rc):
    _stage(workdir, stage, _train(stage_config(rc, stage, workdir)))
  _stage(workdir, "search", search_stage(rc, workdir))
  _stage(workdir, "router", router_stage(rc, workdir))
  for name in visor_tr_stages(rc):
    _stage(workdir, name, _train(stage_config(rc, name, workdir)))
  out_dir = paths.join(workdir, "evaluate")
  start = time.time()
  results = evaluate_all(rc, workdir, out_dir, print_fn)
  seconds = {s: _seconds(workdir, s)
             for s in training_stages(rc) + ("search", "router") + tuple(visor_tr_stages(rc))}
  seconds["evaluate"] = time.time() - start
  results["config"] = rc.to_dict()
  results["seconds"] = seconds
  results["title"] = "VISOR on the pages dataset: the reproduction's table"
  results["preamble"] = (
      f"`python -m visor_jax.reproduce --config=configs/reproduce.py"
      f"{'' if rc.scale == 'full' else ':scale=' + rc.scale}`, seed {rc.seed}, grid {rc.grid} "
      f"({1 + rc.grid * (rc.grid + 1)} visual tokens); {platform.processor() or 'cpu'} "
      f"({_cpu_model()}, {os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}; "
      f"{sum(seconds.values()) / 60:.1f} min in all. Accuracy % [95% Wilson interval] on the "
      f"test split; FLOPs are prefill FLOPs per sample; savings are the base model's FLOPs "
      f"over the row's.")
  results["sections"] = {
      "Control: rows permuted (labels re-derived from the shown layout)": "\n".join(
          report.table_lines(results["permuted_rows"], list(results["families"]))),
      "Time per stage (s)": ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())}
  written = report.write(results, paths.join(workdir, "results"))
  print_fn(paths.read_text(written["md"]))
  print_fn(f"wrote {written}")
  return results


config_flags.DEFINE_config_file("config", "configs/reproduce.py", "Reproduction config.",
                                lock_config=False)
flags.DEFINE_string("workdir", "visor_repro", "Every stage's run, the evaluations, results/.")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("visor_jax").setLevel(logging.INFO)
  reproduce(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
