"""Evaluation harness: items → answers → scores, FLOPs and budgets per question group, dataset
and tag; a Pareto plot (accuracy vs FLOPs); the feasible-budget frontier. This is the one
meaning of "accuracy" in the project: a generated answer scored by `evaluation/metrics.py`.

WHY this shape: VISOR's claim is an accuracy/compute trade-off, measured over *fixed* budgets
(every candidate SA set, to pick the frontier universal training samples from) and with the
*router* (a budget per sample). So the harness never knows how answers are produced: it takes
`answer_fn(items) -> [(prediction, sa_layers_used, llm_flops, total_flops), ...]`, and fixed
budgets, the router or a test fake drive the same code. LLM and total FLOPs are reported side
by side (the vision tower dominates at 0.5B). Pieces: loading (`load_questions`,
`synthetic_items`), scoring (`run_eval`), `aggregate`, `plot_pareto`, the frontier
(`candidate_subsets`, `pareto_frontier`, `write_feasible`; the file format is
`budgets.write_feasible` / `budgets.read_feasible`), `run_suite`.

Question files are JSONL, one object per line::

  {"image": "rel/path.png", "question": "...", "answers": ["..", ..] | "answer": "..",
   "metric": "vqa_accuracy" | "anls" | "relaxed_accuracy" | "exact_match" | "multiple_choice",
   "dataset": "..." (default: file name stem), "tags": ["easy"], "choices": [..], "id": ..}

An item's question group (a column of the tables) is its first tag, else its dataset; for the
synthetic dataset that is the record's family. Nothing here knows a dataset's group names.

Image paths are relative to the image root (`load_questions`' `image_root`, default: the
question file's directory) and confined to it as training confines its records'
(`conversations.ImageLoader`): a question file is input like any other, so an absolute path, or
one that `..` or a symlink leads out of the root, is `unsafe_path`, never opened.

Bad input never stops an evaluation: a line that is not JSON (`invalid_json`), lacks a field
(`missing_field`), has an unusable one (`bad_field`), or whose image is absent, undecodable or
outside the image root (`missing_image` / `corrupt_image` / `unsafe_path`) is skipped, logged,
and counted per reason in the result.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from visor_jax import budgets as budgets_lib
from visor_jax import paths
from visor_jax.data.conversations import BadSample, ImageLoader
from visor_jax.evaluation import metrics as eval_metrics

log = logging.getLogger(__name__)

# The first three are load-time reasons (`run_eval` counts them into `n_items`); the others
# are found when the image is read, on items already counted.
SKIP_REASONS = ("invalid_json", "missing_field", "bad_field", "missing_image", "corrupt_image",
                "unsafe_path")
MAX_SKIP_EXAMPLES = 20   # skipped items quoted in the result file (all are counted)
ROUTER = None            # `make_answer_fn(ROUTER)`: the router picks each sample's budget


class BadItem(Exception):
  """An item the harness skips; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, message: str):
    super().__init__(reason, message)
    self.reason, self.message = reason, message


@dataclasses.dataclass(frozen=True)
class Item:
  """One benchmark question. `image` is a path / encoded bytes on load, and a decoded PIL
  image when `answer_fn` receives it. Its first tag is its question group (a column of the
  table, e.g. a synthetic family); items without tags are grouped by dataset."""
  id: str
  dataset: str
  question: str
  answers: tuple[str, ...]
  metric: str
  image: Any
  tags: tuple[str, ...] = ()
  choices: tuple[str, ...] | None = None
  source: str = ""      # "file.jsonl:12", for messages
  # A path `image` is read under this root and may not leave it (None: used as given, for
  # trusted callers that build items themselves).
  image_root: str | None = None

  @property
  def group(self) -> str:
    return self.tags[0] if self.tags else self.dataset


@dataclasses.dataclass
class Skips:
  """Skipped items: counts per reason, and the first few with their message."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)

  def add(self, reason: str, source: str, message: str) -> None:
    self.counts[reason] += 1
    if len(self.examples) < MAX_SKIP_EXAMPLES:  # logs rate-limited too; all are counted
      self.examples.append({"reason": reason, "source": source, "message": message})
      log.warning("eval: skipped %s (%s): %s", source, reason, message)

  def copy(self) -> "Skips":
    return Skips(collections.Counter(self.counts), list(self.examples))


# ---------------------------------------------------------------------------------------------
# Items.

def parse_item(obj: Any, *, source: str, default_dataset: str, image_root: str | None) -> Item:
  """A question-file object → `Item`; raises `BadItem` naming the reason."""
  if not isinstance(obj, dict):
    raise BadItem("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
  answers = obj.get("answers", obj.get("answer"))
  missing = [k for k, v in (("image", obj.get("image")), ("question", obj.get("question")),
                            ("answers", answers), ("metric", obj.get("metric"))) if v is None]
  if missing:
    raise BadItem("missing_field", f"missing field(s) {missing}")
  answers = [answers] if isinstance(answers, str) else answers
  if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
    raise BadItem("bad_field", "answers must be a string or a non-empty list of strings")
  if obj["metric"] not in eval_metrics.METRICS:
    raise BadItem("bad_field", f"unknown metric {obj['metric']!r}")
  if not isinstance(obj["question"], str) or not isinstance(obj["image"], str):
    raise BadItem("bad_field", "question and image must be strings")
  tags, choices = obj.get("tags", []), obj.get("choices")
  if isinstance(tags, str):
    tags = [tags]
  if not isinstance(tags, list) or (choices is not None and not isinstance(choices, list)):
    raise BadItem("bad_field", "tags and choices must be lists")
  # The path stays as written: the loader joins it to `image_root` and checks where it leads
  # when it opens it (a check here could be outrun by a symlink changed in between).
  return Item(id=str(obj.get("id", source)), dataset=str(obj.get("dataset", default_dataset)),
              question=obj["question"], answers=tuple(answers), metric=obj["metric"],
              image=obj["image"], tags=tuple(str(t) for t in tags),
              choices=None if choices is None else tuple(str(c) for c in choices),
              source=source, image_root=image_root)


def load_questions(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   skips: Skips | None = None) -> tuple[list[Item], Skips]:
  """Items of a JSONL question file; bad lines go to `skips`. Image paths are relative to
  `image_root` (default: the file's directory) and may not leave it (`unsafe_path`). Images
  are only read at answer time, so a large benchmark never sits decoded in memory."""
  path = os.fspath(path)
  root = (os.fspath(image_root) if image_root is not None
          else paths.dirname(paths.normalize(path)))
  default_dataset = os.path.splitext(paths.basename(path))[0]
  skips = skips if skips is not None else Skips()
  items = []
  with paths.open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      source = f"{paths.basename(path)}:{lineno}"
      try:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise BadItem("invalid_json", str(e)) from None
        items.append(parse_item(obj, source=source, default_dataset=default_dataset,
                                image_root=root))
      except BadItem as e:
        skips.add(e.reason, source, e.message)
  return items, skips


def items_from_synthetic(records: Iterable[dict], dataset: str = "synthetic") -> list[Item]:
  """Synthetic-dataset records → items (exact match; family and question kind as tags)."""
  out = []
  for r in records:
    question = r["conversations"][0]["value"].replace("<image>", "").strip()
    out.append(Item(id=r["id"], dataset=dataset, question=question, answers=(r["answer"],),
                    metric="exact_match", image=r["image"], tags=(r["family"], r["kind"]),
                    source=r["id"]))
  return out


def synthetic_items(data_dir: str, split: str = "test", limit: int | None = None,
                    dataset: str = "synthetic", **params) -> list[Item]:
  """A built embedded dataset's split as items: `dataset` names it ('synthetic' or 'pages',
  `sources.EMBEDDED`), `params` are its generation parameters (as for its `records`)."""
  from visor_jax.data import sources  # tensorflow_datasets: imported only when used
  if dataset not in sources.EMBEDDED:
    raise ValueError(f"dataset={dataset!r} is not one of {sorted(sources.EMBEDDED)}.")
  sources.quiet_tfds()
  recs = sources.EMBEDDED[dataset][0].records(split, data_dir, **params)
  n = len(recs) if limit is None else min(limit, len(recs))
  return items_from_synthetic((recs[i] for i in range(n)), dataset=dataset)


# ---------------------------------------------------------------------------------------------
# Answering and scoring.

def _load_images(batch: Sequence[Item], loaders: dict, skips: Skips) -> list[Item]:
  """Decodes each item's image under its root (`loaders`: root → ImageLoader, filled as
  roots appear); unreadable or unsafe ones are skipped (counted) here."""
  ready = []
  for item in batch:
    if item.image_root not in loaders:
      loaders[item.image_root] = ImageLoader(item.image_root)
    try:
      ready.append(dataclasses.replace(item, image=loaders[item.image_root](item.image)))
    except BadSample as e:  # missing/corrupt_image, unsafe_path; "malformed": an odd reference
      reason = e.reason if e.reason in SKIP_REASONS else "bad_field"
      skips.add(reason, item.source or item.id, e.message)
  return ready


def _record(item: Item, answer: Sequence, flops_fn: Callable | None) -> dict:
  """One scored sample, JSON-able."""
  if len(answer) != 4:
    raise ValueError(f"answer_fn must return (prediction, sa_layers, llm_flops, total_flops) "
                     f"per item, got {answer!r}")
  prediction, sa_layers, llm, total = answer
  sa_layers = sorted(int(i) for i in sa_layers)
  if llm is None or total is None:
    if flops_fn is None:
      raise ValueError(f"answer_fn gave no FLOPs for {item.id} and no flops_fn was passed.")
    llm, total = flops_fn(item, sa_layers)
  return {"id": item.id, "dataset": item.dataset, "tags": list(item.tags),
          "metric": item.metric, "question": item.question, "answers": list(item.answers),
          "prediction": str(prediction),
          "score": eval_metrics.score(item.metric, str(prediction), item.answers,
                                      choices=item.choices),
          "group": item.group, "sa_layers": sa_layers, "budget": budgets_lib.label(sa_layers),
          "llm_flops": float(llm), "total_flops": float(total)}


def answer_and_score(items: Sequence[Item], answer_fn: Callable, *, batch_size: int = 8,
                     skips: Skips | None = None, flops_fn: Callable | None = None
                     ) -> tuple[list[dict], Skips]:
  """Per-sample records, in item order, over batches of items with decoded images."""
  skips = skips if skips is not None else Skips()
  loaders, records = {}, []
  for start in range(0, len(items), batch_size):
    batch = _load_images(items[start:start + batch_size], loaders, skips)
    if not batch:
      continue
    answers = list(answer_fn(batch))
    if len(answers) != len(batch):
      raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)} items.")
    records += [_record(item, a, flops_fn) for item, a in zip(batch, answers)]
  return records, skips


def summarize(records: Sequence[dict]) -> dict:
  """Accuracy (mean score) with its 95% Wilson interval (acc_lo, acc_hi), mean FLOPs per
  sample, mean #SA layers, budget histogram."""
  n = len(records)
  mean = lambda key: float(np.mean([r[key] for r in records])) if n else float("nan")
  hist = collections.Counter(r["budget"] for r in records)
  lo, hi = eval_metrics.wilson_interval(sum(r["score"] for r in records), n)
  return {"n": n, "accuracy": mean("score"), "acc_lo": lo, "acc_hi": hi,
          "mean_llm_flops": mean("llm_flops"),
          "mean_total_flops": mean("total_flops"),
          "mean_sa_layers": float(np.mean([len(r["sa_layers"]) for r in records])) if n
          else float("nan"),
          "budget_histogram": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))}


def aggregate(records: Sequence[dict]) -> dict:
  """Overall, per question group (`Item.group`), per dataset and per tag summaries.
  `overall.dataset_mean_accuracy` is the unweighted mean over datasets, the paper's
  "easy avg" / "hard avg" style of number."""
  by_dataset, by_tag = collections.defaultdict(list), collections.defaultdict(list)
  by_group = collections.defaultdict(list)
  for r in records:
    by_dataset[r["dataset"]].append(r)
    by_group[r["group"]].append(r)
    for t in dict.fromkeys(r["tags"]):
      by_tag[t].append(r)
  per_dataset = {d: {**summarize(rs), "metrics": sorted({r["metric"] for r in rs})}
                 for d, rs in sorted(by_dataset.items())}
  overall = summarize(records)
  overall["dataset_mean_accuracy"] = (float(np.mean([s["accuracy"] for s in per_dataset.values()]))
                                      if per_dataset else float("nan"))
  return {"overall": overall, "per_dataset": per_dataset,
          "per_group": {g: summarize(rs) for g, rs in sorted(by_group.items())},
          "per_tag": {t: summarize(rs) for t, rs in sorted(by_tag.items())}}


def run_eval(items: Sequence[Item], answer_fn: Callable, *, label: str = "",
             sa_layers: Sequence[int] | None = None, batch_size: int = 8,
             skips: Skips | None = None, flops_fn: Callable | None = None,
             keep_samples: bool = True) -> dict:
  """One evaluation run → a JSON-able result.

  `answer_fn(list[Item]) -> list[(prediction, sa_layers_used, llm_flops, total_flops)]`;
  a FLOPs value may be None when `flops_fn(item, sa_layers) -> (llm, total)` is given.
  `sa_layers` marks a fixed-budget run (None: a router run). `skips` carries the load-time
  skips (copied, not modified), so the result counts every skipped item; `n_items` counts
  items loaded plus lines skipped at load time.
  """
  skips = skips.copy() if skips is not None else Skips()
  records, skips = answer_and_score(items, answer_fn, batch_size=batch_size, skips=skips,
                                    flops_fn=flops_fn)
  fixed = sa_layers is not None
  result = {"label": label or (budgets_lib.label(sa_layers) if fixed else "router"),
            "kind": "fixed" if fixed else "router",
            "sa_layers": sorted(int(i) for i in sa_layers) if fixed else None,
            "n_items": len(items) + sum(skips.counts[r] for r in SKIP_REASONS[:3]),
            "n_scored": len(records), "skipped": {r: skips.counts[r] for r in SKIP_REASONS},
            "skipped_examples": skips.examples, **aggregate(records)}
  if keep_samples:
    result["samples"] = records
  return result


def _finite(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return None if isinstance(x, float) and not math.isfinite(x) else x


def write_json(obj: Any, path: str | os.PathLike) -> str:
  """Writes JSON (NaN as null: strict JSON readers choke on NaN), creating the folder."""
  path = os.fspath(path)
  paths.makedirs(paths.dirname(paths.normalize(path)))
  with paths.open(path, "w", encoding="utf-8") as f:
    json.dump(_finite(obj), f, indent=1)
  return path


# ---------------------------------------------------------------------------------------------
# Pareto plot.

X_AXES = {"llm": ("mean_llm_flops", "LLM GFLOPs / sample"),
          "total": ("mean_total_flops", "total GFLOPs / sample")}


def plot_pareto(results: Sequence[dict], path: str | os.PathLike, *, x: str = "both",
                accuracy_key: str = "accuracy", title: str | None = None) -> str:
  """Accuracy vs FLOPs: one dot per fixed budget (frontier dashed), a star for the router.

  `x`: "llm", "total" or "both" (two panels); `accuracy_key`: a key of `overall`
  ("accuracy" or "dataset_mean_accuracy").
  """
  import matplotlib
  matplotlib.use("Agg")  # headless: never needs a display
  import matplotlib.pyplot as plt

  axes_keys = ["llm", "total"] if x == "both" else [x]
  if any(k not in X_AXES for k in axes_keys):
    raise ValueError(f"x={x!r}: expected 'llm', 'total' or 'both'.")
  fig, axes = plt.subplots(1, len(axes_keys), figsize=(6.5 * len(axes_keys), 4.8), squeeze=False)
  for ax, key in zip(axes[0], axes_keys):
    cost_key, xlabel = X_AXES[key]
    pts = [(r["overall"][cost_key] / 1e9, r["overall"][accuracy_key], r) for r in results]
    fixed = [p for p in pts if p[2]["kind"] == "fixed"]
    for i, (cx, acc, r) in enumerate(fixed):
      ax.scatter(cx, acc, color="tab:blue", marker="o", zorder=3,
                 label="fixed budget" if i == 0 else None)
      ax.annotate(r["label"], (cx, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_frontier([{"c": cx, "a": acc} for cx, acc, _ in fixed],
                            cost_key="c", acc_key="a")
    if len(front) > 1:
      ax.plot([p["c"] for p in front], [p["a"] for p in front], "--", color="tab:blue",
              alpha=0.6, label="fixed-budget frontier")
    for cx, acc, r in (p for p in pts if p[2]["kind"] != "fixed"):
      ax.scatter(cx, acc, color="tab:red", marker="*", s=220, zorder=4, label=r["label"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(accuracy_key.replace("_", " "))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, loc="best")
  fig.suptitle(title or "accuracy vs FLOPs")
  return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> str:
  """Writes a matplotlib figure as a PNG (creating its directory) and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  path = os.fspath(path)
  paths.makedirs(paths.dirname(paths.normalize(path)))
  with paths.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------
# Feasible budgets: the accuracy/FLOPs frontier over candidate SA subsets.

def candidate_subsets(sa_candidates: Sequence[int], *, exhaustive_sizes: Sequence[int] = (0, 1, 2),
                      max_count: int = 64) -> list[list[int]]:
  """Budgets worth measuring: a spread subset of every size 0..n (the full set included),
  then every subset of the `exhaustive_sizes`. Above `max_count`, the spread subsets are all
  kept and the exhaustive ones thinned evenly (deterministic)."""
  cands = sorted(int(c) for c in sa_candidates)
  spread = [budgets_lib.spread_layers(cands, k) for k in range(len(cands) + 1)]
  seen = {tuple(s) for s in spread}
  extra = [list(c) for k in sorted(set(exhaustive_sizes)) if 0 <= k <= len(cands)
           for c in itertools.combinations(cands, k) if c not in seen]
  room = max(0, max_count - len(spread))
  if len(extra) > room:
    keep = np.round(np.linspace(0, len(extra) - 1, room)).astype(int) if room else []
    extra = [extra[i] for i in keep]
  return sorted(spread + extra, key=lambda s: (len(s), s))


def pareto_frontier(rows: Sequence[dict], *, cost_key: str = "llm_flops", acc_key: str = "acc",
                    min_gain: float = 0.0) -> list[dict]:
  """Cheapest-first rows that are not dominated: each has strictly better accuracy (by more
  than `min_gain`) than every cheaper row kept. Ties in cost: the more accurate one first."""
  order = sorted(rows, key=lambda r: (r[cost_key], -r[acc_key], len(r.get("sa_layers", ()))))
  front, best = [], -math.inf
  for r in order:
    if r[acc_key] > best + min_gain:
      front.append(r)
      best = r[acc_key]
  return front


def rows_from_results(results: Sequence[dict], accuracy_key: str = "accuracy") -> list[dict]:
  """Fixed-budget run results → frontier rows {sa_layers, acc, llm_flops, total_flops}."""
  return [{"sa_layers": r["sa_layers"], "acc": r["overall"][accuracy_key],
           "llm_flops": r["overall"]["mean_llm_flops"],
           "total_flops": r["overall"]["mean_total_flops"]}
          for r in results if r["kind"] == "fixed"]


def frontier_table(rows: Sequence[dict], *, cost_key: str = "llm_flops",
                   min_gain: float = 0.0) -> dict:
  """{"feasible_budgets": [[...], ...] cheapest first, "table": every row, cheapest first,
  flagged `on_frontier`}."""
  front = pareto_frontier(rows, cost_key=cost_key, min_gain=min_gain)
  on = {tuple(r["sa_layers"]) for r in front}
  table = [{"sa_layers": list(r["sa_layers"]), "acc": r["acc"], "llm_flops": r["llm_flops"],
            "total_flops": r["total_flops"], "on_frontier": tuple(r["sa_layers"]) in on}
           for r in sorted(rows, key=lambda r: (r[cost_key], -r["acc"]))]
  return {"cost_key": cost_key, budgets_lib.FEASIBLE_KEY: [list(r["sa_layers"]) for r in front],
          "table": table}


def write_feasible(path: str | os.PathLike, rows: Sequence[dict], *, cost_key: str = "llm_flops",
                   min_gain: float = 0.0) -> dict:
  """The frontier of `rows` as a feasible.json (`budgets.write_feasible`'s format, with the
  search's table beside the budgets)."""
  table = frontier_table(rows, cost_key=cost_key, min_gain=min_gain)
  budgets_lib.write_feasible(path, table["feasible_budgets"], cost_key=cost_key,
                             table=_finite(table["table"]))
  return table


# ---------------------------------------------------------------------------------------------
# Driver.

def run_suite(items: Sequence[Item], make_answer_fn: Callable, layer_sets: Sequence[Sequence[int]],
              out_dir: str | os.PathLike, *, router: bool = True, skips: Skips | None = None,
              x: str = "both", cost_key: str = "llm_flops", accuracy_key: str = "accuracy",
              **run_kwargs) -> dict:
  """Evaluates each fixed budget (`make_answer_fn(sa_layers)`) and, if `router`, the router
  (`make_answer_fn(ROUTER)`); writes `results_<label>.json` per run, `feasible.json` (the
  fixed budgets' frontier), `summary.json` and `pareto.png` under `out_dir`."""
  out_dir = os.fspath(out_dir)
  runs = [list(s) for s in layer_sets] + ([ROUTER] if router else [])
  results = []
  for sa_layers in runs:  # one answer_fn at a time: a real one may hold device memory
    r = run_eval(items, make_answer_fn(sa_layers), sa_layers=sa_layers, skips=skips,
                 **run_kwargs)
    write_json(r, paths.join(out_dir, f"results_{budgets_lib.file_label(r['label'])}.json"))
    results.append(r)
    log.info("eval %s: acc %.4f, LLM %.3g FLOPs, total %.3g FLOPs (%d scored)", r["label"],
             r["overall"]["accuracy"], r["overall"]["mean_llm_flops"],
             r["overall"]["mean_total_flops"], r["n_scored"])
  summary = {"runs": [{k: v for k, v in r.items() if k != "samples"} for r in results]}
  rows = rows_from_results(results, accuracy_key)
  if rows:
    summary["feasible"] = write_feasible(paths.join(out_dir, "feasible.json"), rows,
                                         cost_key=cost_key)
  write_json(summary, paths.join(out_dir, "summary.json"))
  plot_pareto(results, paths.join(out_dir, "pareto.png"), x=x, accuracy_key=accuracy_key)
  return summary
