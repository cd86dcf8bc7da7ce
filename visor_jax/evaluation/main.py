"""Evaluation entry point: accuracy vs FLOPs per budget, the router, and the feasible-budget search.

  # Pareto mode (default): fixed budgets (+ the router) on the test split → results, pareto.png
  python -m visor_jax.evaluation.main --model=/tmp/visor_universal --out=/tmp/eval --router
  python -m visor_jax.evaluation.main --model=DIR --out=OUT --questions=a.jsonl,b.jsonl \
      --image_root=/data/images --budgets="[];[4];[1,4]"
  # Search mode: every candidate SA subset on the validation split → feasible.json
  python -m visor_jax.evaluation.main --model=DIR --out=OUT --mode=search --max_candidates=32

"Accuracy" means one thing in this project: a *generated* answer scored by
`evaluation/metrics.py`. The trainer's end-of-run table calls `evaluate` below on validation
items, so it prints the numbers this entry point prints.

WHY a thin layer over `harness.py`: the harness knows nothing about models (it takes an
`answer_fn`), and `inference.serving.Assistant` knows nothing about benchmarks; this file wires
the two together, picks the items (question files and/or the synthetic split the model was
trained on, with the generation parameters read from the run's saved config so the split is the
same) and the budgets, and prints a table. `run()` is the whole program; `main()` maps flags.

Outputs under --out: results_<budget>.json per run (every sample with its prediction, score,
budget and FLOPs), summary.json, feasible.json (the frontier of the fixed budgets evaluated,
cheapest first, in `budgets.write_feasible`'s format, which configs' `budgets` and the router's
`model.router.feasible` take), pareto.png. FLOPs are prefill FLOPs (see serving.py).
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Sequence

from visor_jax import budgets as budgets_lib
from visor_jax import paths, runs
from visor_jax.data import sources
from visor_jax.evaluation import harness
from visor_jax.evaluation import metrics as eval_metrics
from visor_jax.inference import serving

log = logging.getLogger(__name__)

MODES = ("pareto", "search")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


# ---------------------------------------------------------------------------------------------
# Items.

def _embedded_source(run: runs.Run | None) -> str | None:
  """'synthetic' / 'pages' when the model is a run trained on that embedded dataset."""
  d = (run.config or {}).get("data") if run is not None else None
  return d.source if d is not None and d.get("source") in sources.EMBEDDED else None


def synthetic_params(run: runs.Run | None, overrides: dict | None = None) -> dict:
  """Generation parameters of the run's embedded dataset (its `data.synthetic_*` fields, so
  the split matches what it trained on), then explicit overrides (None = not given)."""
  source = _embedded_source(run)
  params = sources.EMBEDDED[source][1](run.config.data) if source else {}
  params.update({k: v for k, v in (overrides or {}).items() if v is not None})
  return params


def default_synthetic_dir(run: runs.Run) -> str | None:
  """Where a run trained on an embedded dataset keeps it, when the model is such a run."""
  return sources.synthetic_dir(run.config.data, run.workdir) if _embedded_source(run) else None


def gather_items(run: runs.Run, *, questions: Sequence[str] = (),
                 image_root: str | None = None, synthetic_dir: str | None = None,
                 split: str = "test", limit: int | None = None,
                 synthetic_overrides: dict | None = None
                 ) -> tuple[list[harness.Item], harness.Skips]:
  """Items from question files (bad lines skipped and counted) and/or the synthetic split.
  With neither, a synthetic training run's own dataset is used."""
  items, skips = [], harness.Skips()
  for path in questions:
    loaded, skips = harness.load_questions(path, image_root, skips)
    items += loaded[:limit] if limit else loaded
  if not questions and not synthetic_dir:
    synthetic_dir = default_synthetic_dir(run)
    if synthetic_dir is None:
      raise ValueError("nothing to evaluate: pass --questions and/or --synthetic_dir (the "
                       "model is not a synthetic-data training run).")
  if synthetic_dir:
    items += harness.synthetic_items(synthetic_dir, split, limit=limit,
                                     dataset=_embedded_source(run) or "synthetic",
                                     **synthetic_params(run, synthetic_overrides))
  if not items:
    raise ValueError("no usable items to evaluate (see the skipped-line warnings).")
  return items, skips


def training_items(config, workdir: str) -> tuple[list[harness.Item], harness.Skips]:
  """The trainer's end-of-run evaluation items: the first `config.eval_items` of the
  validation split (synthetic) or of `data.eval_questions` (JSON runs); none when
  `eval_items` is 0 or a JSON run names no question file."""
  d, limit = config.data, config.eval_items
  if not limit:
    return [], harness.Skips()
  found = sources.embedded(d)
  if found is not None:
    return (harness.synthetic_items(sources.synthetic_dir(d, workdir), "validation",
                                    limit=limit, dataset=d.source, **found[1]),
            harness.Skips())
  if d.get("eval_questions"):
    items, skips = harness.load_questions(d.eval_questions, d.image_root or None)
    return items[:limit], skips
  log.warning("no end-of-run accuracy table: data.eval_questions is not set for this "
              "source=%r run.", d.source)
  return [], harness.Skips()


# ---------------------------------------------------------------------------------------------
# Budgets.

def fixed_budgets(run: runs.Run, spec: str | Sequence | None) -> budgets_lib.LayerSets:
  """The fixed budgets to evaluate (`budgets.resolve`: a feasible.json path, '[];[4]',
  'maximal', 'default', a list; 'all' = LLaVA-OV is allowed); None → the router's feasible
  set, else `budgets.default_feasible`."""
  if spec is None and run.cfg.router.enabled:
    spec = [list(b) for b in run.cfg.router.feasible]
  return budgets_lib.resolve(spec, run.cfg, "--budgets", allow_all=True)


# ---------------------------------------------------------------------------------------------
# Answering.

def prompt_of(item: harness.Item) -> str:
  """The question as asked; multiple-choice items list their options (lmms-eval's LLaVA-OV
  style) so the model can answer with a letter."""
  if not item.choices:
    return item.question
  options = [f"{eval_metrics.LETTERS[i]}. {t}"
             for i, t in enumerate(eval_metrics.option_texts(item.choices))]
  return "\n".join([item.question, *options, MC_SUFFIX])


def answer_fn_factory(assistant: serving.Assistant, *, threshold: float | None = None,
                      max_new_tokens: int = 16, batch_size: int | None = None) -> Callable:
  """`make_answer_fn(sa_layers)` for `harness.run_suite`: `harness.ROUTER` (None) → the
  router decides at `threshold`; a list → that fixed budget. Batches are padded to
  `batch_size` (one compiled shape for the last, short batch too)."""
  def make_answer_fn(sa_layers):
    def answer_fn(items):
      answers = assistant.answer([it.image for it in items], [prompt_of(it) for it in items],
                                 sa_layers=sa_layers,
                                 threshold=threshold if sa_layers is harness.ROUTER else None,
                                 max_new_tokens=max_new_tokens, pad_to=batch_size)
      return [(a.text, a.sa_layers, a.llm_flops, a.total_flops) for a in answers]
    return answer_fn
  return make_answer_fn


def evaluate_reductions(assistant: serving.Assistant, items: Sequence[harness.Item],
                        out_dir: str, reductions: Sequence, *, skips: harness.Skips | None = None,
                        batch_size: int = 8, max_new_tokens: int = 16) -> list[dict]:
  """Token-reduction rows (`models.token_reduction`, e.g. "FastV 50%"): each reduction answers
  every item (greedy, no KV cache: serving.Assistant._answer_reduced; VISOR-TR at the maximal
  budget); writes results_<label>.json and returns `harness.run_eval` results of kind
  'reduction' (not budgets: they stay out of feasible.json and the frontier)."""
  results = []
  for reduction in reductions:
    def answer_fn(batch, reduction=reduction):
      answers = assistant.answer([it.image for it in batch], [prompt_of(it) for it in batch],
                                 reduction=reduction, max_new_tokens=max_new_tokens,
                                 pad_to=batch_size)
      return [(a.text, a.sa_layers, a.llm_flops, a.total_flops) for a in answers]
    layers = (budgets_lib.resolve_one(assistant.cfg, "maximal")
              if reduction.method == "visor_tr" else list(range(assistant.cfg.num_layers)))
    r = harness.run_eval(items, answer_fn, label=reduction.label, sa_layers=layers,
                         batch_size=batch_size, skips=skips)
    r.update(kind="reduction", reduction={"method": reduction.method, "keep": reduction.keep})
    harness.write_json(r, paths.join(out_dir,
                                       f"results_{budgets_lib.file_label(r['label'])}.json"))
    results.append({k: v for k, v in r.items() if k != "samples"})
  return results


# ---------------------------------------------------------------------------------------------
# Table.

def _columns(runs_: Sequence[dict]) -> list[str]:
  """The question groups (items' first tags: e.g. a synthetic family), up to 8."""
  return sorted({g for r in runs_ for g in r["per_group"]})[:8]


def format_table(runs_: Sequence[dict]) -> str:
  """Budget | accuracy [95% interval] overall and per question group | mean LLM / total
  GFLOPs | mean #SA; the n of each column and the router's budget histogram below."""
  if not runs_:
    return "(no runs)"
  names = _columns(runs_)
  def fmt(s):
    if s is None or s["n"] == 0:
      return f"{'-':>15}"
    return f"{s['accuracy']:.2f} [{s['acc_lo']:.2f},{s['acc_hi']:.2f}]"
  head = (f"{'budget':<16} {'all':>15} " + " ".join(f"{n[:15]:>15}" for n in names)
          + f" {'LLM GFLOPs':>11} {'total GFLOPs':>13} {'#SA':>5}")
  lines = ["accuracy of generated answers (evaluation/metrics.py) [95% Wilson interval], "
           "prefill FLOPs per sample", head, "-" * len(head)]
  for r in runs_:
    o, by = r["overall"], r["per_group"]
    accs = " ".join(fmt(by.get(n)) for n in names)
    lines.append(f"{r['label']:<16} {fmt(o)} {accs} "
                 f"{o['mean_llm_flops'] / 1e9:11.4g} {o['mean_total_flops'] / 1e9:13.4g} "
                 f"{o['mean_sa_layers']:5.2f}")
  o, by = runs_[0]["overall"], runs_[0]["per_group"]
  lines.append("n: " + ", ".join([f"all {o['n']}"] + [f"{n} {by[n]['n']}" for n in names
                                                       if n in by]))
  for r in runs_:
    if r["kind"] == "router":
      hist = ", ".join(f"{b}: {c}" for b, c in r["overall"]["budget_histogram"].items())
      lines.append(f"router budgets: {hist}")
  skipped = {k: v for k, v in runs_[0]["skipped"].items() if v}
  if skipped:
    lines.append(f"skipped items: {skipped}")
  return "\n".join(lines)


def format_frontier(feasible: dict) -> str:
  lines = [f"{'budget':<16} {'acc':>6} {'LLM GFLOPs':>11} {'total GFLOPs':>13} frontier"]
  for row in feasible["table"]:
    lines.append(f"{budgets_lib.label(row['sa_layers']):<16} {row['acc']:6.3f} "
                 f"{row['llm_flops'] / 1e9:11.4g} {row['total_flops'] / 1e9:13.4g} "
                 f"{'*' if row['on_frontier'] else ''}")
  lines.append("feasible budgets (cheapest first): "
               + json.dumps(feasible[budgets_lib.FEASIBLE_KEY]))
  return "\n".join(lines)


def scalars(summary: dict) -> dict[str, float]:
  """TensorBoard / metrics.jsonl scalars of a summary: eval/<budget>/acc[_<group>], GFLOPs."""
  out = {}
  for r in summary.get("runs", ()):
    key = f"eval/{budgets_lib.file_label(r['label'])}"
    out[f"{key}/acc"] = r["overall"]["accuracy"]
    out[f"{key}/llm_gflops"] = r["overall"]["mean_llm_flops"] / 1e9
    for g, sub in r["per_group"].items():
      out[f"{key}/acc_{budgets_lib.file_label(g)}"] = sub["accuracy"]
  return out


# ---------------------------------------------------------------------------------------------
# The program.

def evaluate(model: runs.Run | serving.Assistant, items: Sequence[harness.Item], out_dir: str,
             *, layer_sets: budgets_lib.LayerSets, router: bool = False,
             threshold: float | None = None, skips: harness.Skips | None = None,
             batch_size: int = 8, max_new_tokens: int = 16, print_fn: Callable = print,
             reductions: Sequence = ()) -> dict:
  """Each fixed budget of `layer_sets` (+ the router, + the token `reductions` as extra rows)
  on `items`; writes the results under `out_dir`, prints the table, returns
  `harness.run_suite`'s summary."""
  assistant = model if isinstance(model, serving.Assistant) else serving.Assistant(model)
  use_router = router and assistant.has_router
  if router and not assistant.has_router:
    log.warning("--router: the model has no router (model.router.feasible is empty); "
                "evaluating fixed budgets only.")
  print_fn(f"evaluating {len(items)} items ({len(layer_sets)} fixed budgets"
           f"{' + router' if use_router else ''}) from {assistant.run.path}")
  make = answer_fn_factory(assistant, threshold=threshold, max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
  summary = harness.run_suite(items, make, layer_sets, out_dir, router=use_router,
                              skips=skips, batch_size=batch_size)
  if reductions:
    summary["runs"] += evaluate_reductions(assistant, items, out_dir, reductions, skips=skips,
                                           batch_size=batch_size, max_new_tokens=max_new_tokens)
    harness.write_json(summary, paths.join(out_dir, "summary.json"))
  print_fn(format_table(summary["runs"]))
  return summary


def run(model: str | serving.Assistant, out_dir: str, *, mode: str = "pareto",
        questions: Sequence[str] = (), image_root: str | None = None,
        synthetic_dir: str | None = None, synthetic_split: str | None = None,
        synthetic_overrides: dict | None = None, limit: int | None = None,
        budgets: str | Sequence | None = None, router: bool = False,
        threshold: float | None = None, batch_size: int = 8, max_new_tokens: int = 16,
        max_candidates: int = 64, exhaustive_sizes: Sequence[int] = (0, 1, 2),
        step: int | None = None, print_fn: Callable = print,
        reduction: str | Sequence | None = None) -> dict:
  """Evaluates `model` (any path `runs.load_run` reads, or a loaded Assistant) and writes the
  results under `out_dir`; returns `harness.run_suite`'s summary.

  pareto: the fixed `budgets` (+ the router when `router` and the model has one) on
  `synthetic_split` (default 'test') and/or the question files.
  search: every subset from `harness.candidate_subsets` (at most `max_candidates`) on
  `synthetic_split` (default 'validation'), no router; feasible.json is the frontier.
  reduction (pareto only): token-reduction rows, 'fastv:0.5,visor_tr:0.5' or Reductions.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}.")
  reductions = _reductions(reduction)  # a bad --reduction fails before any loading
  if reductions and mode == "search":
    raise ValueError("--reduction adds rows to the pareto mode, not to the search.")
  assistant = model if isinstance(model, serving.Assistant) else serving.load(model, step=step)
  split = synthetic_split or ("validation" if mode == "search" else "test")
  items, skips = gather_items(assistant.run, questions=questions, image_root=image_root,
                              synthetic_dir=synthetic_dir, split=split, limit=limit,
                              synthetic_overrides=synthetic_overrides)
  if mode == "search":
    layer_sets = harness.candidate_subsets(assistant.cfg.visor.sa_candidates,
                                           exhaustive_sizes=exhaustive_sizes,
                                           max_count=max_candidates)
  else:
    layer_sets = fixed_budgets(assistant.run, budgets)
  summary = evaluate(assistant, items, out_dir, layer_sets=layer_sets,
                     router=router and mode != "search", threshold=threshold, skips=skips,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, print_fn=print_fn,
                     reductions=reductions)
  if mode == "search" and "feasible" in summary:
    print_fn(format_frontier(summary["feasible"]))
  print_fn(f"wrote {paths.normalize(out_dir)}/{{results_*.json, summary.json, feasible.json, "
           f"pareto.png}}")
  return summary


# ---------------------------------------------------------------------------------------------
# Flags.

def define_flags(fv) -> None:
  from absl import flags
  d = dict(flag_values=fv)
  flags.DEFINE_string("model", None, "An Orbax run, a transformers or an exported directory.",
                      **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", **d)
  flags.DEFINE_string("out", None, "Output directory.", **d)
  flags.DEFINE_enum("mode", "pareto", list(MODES), "pareto: evaluate budgets (+router); "
                    "search: candidate SA subsets → feasible.json.", **d)
  flags.DEFINE_list("questions", [], "JSONL question files (comma-separated).", **d)
  flags.DEFINE_string("image_root", None, "Question files' image paths are relative to this "
                      "directory and may not leave it (default: each question file's "
                      "directory).", **d)
  flags.DEFINE_string("synthetic_dir", None, "Built synthetic dataset (default with no "
                      "--questions: the training run's own).", **d)
  flags.DEFINE_string("synthetic_split", None, "Default: test (pareto), validation (search).", **d)
  flags.DEFINE_integer("synthetic_seed", None, "Default: the run's data.synthetic_seed.", **d)
  flags.DEFINE_string("synthetic_sizes", None, "'train=4,validation=6,test=6'; default: the "
                      "run's data.synthetic_sizes.", **d)
  flags.DEFINE_integer("synthetic_min_side", None, "Default: the run's value.", **d)
  flags.DEFINE_integer("synthetic_max_side", None, "Default: the run's value.", **d)
  flags.DEFINE_integer("limit", None, "At most this many items per source.", **d)
  flags.DEFINE_string("budgets", None, "feasible.json, '[];[4];[1,4]', 'maximal', 'default' "
                      "(budgets.py); default: the router's feasible set, else 'default'.", **d)
  flags.DEFINE_bool("router", False, "Also evaluate the router (if the model has one).", **d)
  flags.DEFINE_string("reduction", None, "Token-reduction rows (pareto mode), e.g. "
                      "'fastv:0.5,pyramiddrop:0.5,visionzip:0.25,visor_tr:0.5' "
                      "(models/token_reduction.py).", **d)
  flags.DEFINE_float("threshold", None, "Router cost knob (default: the model's).", **d)
  flags.DEFINE_integer("batch_size", 8, "Questions per generate call.", **d)
  flags.DEFINE_integer("max_new_tokens", 16, "Generated tokens at most.", **d)
  flags.DEFINE_integer("max_candidates", 64, "search: at most this many SA subsets.", **d)
  flags.DEFINE_list("exhaustive_sizes", ["0", "1", "2"], "search: every subset of these sizes "
                    "(plus one spread subset of every size).", **d)


def _sizes(text: str | None) -> dict | None:
  if not text:
    return None
  try:
    return {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
  except ValueError:
    raise ValueError(f"--synthetic_sizes={text!r}: expected 'train=N,validation=N,test=N'.") \
        from None


def _reductions(spec: str | Sequence | None) -> list:
  """--reduction → Reductions (a list of Reductions passes through)."""
  from visor_jax.models import token_reduction
  if not spec:
    return []
  return token_reduction.parse(spec) if isinstance(spec, str) else list(spec)


def kwargs_from_flags(fv) -> dict:
  """Parsed flags → `run(**kwargs)`."""
  for name in ("model", "out"):
    if not fv[name].value:
      raise ValueError(f"--{name} is required.")
  return dict(
      model=fv.model, out_dir=fv.out, mode=fv.mode, questions=list(fv.questions),
      image_root=fv.image_root, synthetic_dir=fv.synthetic_dir,
      synthetic_split=fv.synthetic_split,
      synthetic_overrides=dict(seed=fv.synthetic_seed, sizes=_sizes(fv.synthetic_sizes),
                               min_side=fv.synthetic_min_side, max_side=fv.synthetic_max_side),
      limit=fv.limit, budgets=fv.budgets, router=fv.router, threshold=fv.threshold,
      batch_size=fv.batch_size, max_new_tokens=fv.max_new_tokens,
      max_candidates=fv.max_candidates,
      exhaustive_sizes=tuple(int(s) for s in fv.exhaustive_sizes), step=fv.step,
      reduction=fv.reduction)


def main(argv) -> None:
  from absl import flags
  del argv
  logging.getLogger().setLevel(logging.WARNING)   # libraries: warnings only
  logging.getLogger("visor_jax").setLevel(logging.INFO)
  try:
    kwargs = kwargs_from_flags(flags.FLAGS)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  run(**kwargs)


if __name__ == "__main__":
  from absl import app, flags as _flags
  define_flags(_flags.FLAGS)
  app.run(main)
