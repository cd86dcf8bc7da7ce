"""The paper-style results of a reproduction: results.json, results.md and the Pareto plot.

Pure functions over the evaluation harness's summaries (`harness.run_eval` results without
samples), so a table can be rebuilt from the files a run left behind. `results.json` is read by
scripts; its shape is fixed (fields may be added):

  {"families": {NAME: {"kind": "coarse"|"fine"|"control"|"interaction", "chance": float}},
   "rows": [{"method": "base"|"visor"|"router"|"visor_tr"|"fastv"|"pyramiddrop"|"visionzip"
                       |"question_only",
             "setting": str, "sa_layers": [int] (VISOR rows),
             "families": {NAME: {"acc", "lo", "hi", "n"}}, "hard": {...},
             "llm_gflops": float, "llm_saving": float, "total_saving": float}],
   "router_histogram": {NAME: {budget label: count}}}

Savings are base FLOPs / row FLOPs (x-fold, per sample, prefill); "hard" pools every family
but the coarse ones. Intervals are 95% Wilson intervals (`metrics.wilson_interval`).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from visor_jax import paths
from visor_jax.evaluation import harness
from visor_jax.evaluation.metrics import wilson_interval

HARD = "hard"


def stat(acc: float, n: int) -> dict:
  lo, hi = wilson_interval(acc * n, n)
  return {"acc": float(acc), "lo": float(lo), "hi": float(hi), "n": int(n)}


def family_stats(summary: Mapping, families: Mapping[str, Mapping]) -> dict:
  """{family: stat} of one harness result, plus 'hard': every non-coarse family pooled."""
  by = summary["per_group"]
  out = {f: stat(by[f]["accuracy"], by[f]["n"]) for f in families if f in by}
  hard = [f for f, spec in families.items() if spec["kind"] != "coarse" and f in by]
  n = sum(by[f]["n"] for f in hard)
  out[HARD] = stat(sum(by[f]["accuracy"] * by[f]["n"] for f in hard) / n if n else float("nan"),
                   n)
  return out


def row(method: str, setting: str, summary: Mapping, families: Mapping, base: Mapping, *,
        sa_layers: Sequence[int] | None = None, **extra) -> dict:
  """One table row from a harness result; `base` is the base model's result (the savings'
  denominator)."""
  o, b = summary["overall"], base["overall"]
  out = {"method": method, "setting": setting, "families": family_stats(summary, families),
         "llm_gflops": o["mean_llm_flops"] / 1e9, "total_gflops": o["mean_total_flops"] / 1e9,
         "llm_saving": b["mean_llm_flops"] / o["mean_llm_flops"],
         "total_saving": b["mean_total_flops"] / o["mean_total_flops"],
         "mean_sa_layers": o.get("mean_sa_layers")}
  if sa_layers is not None:
    out["sa_layers"] = [int(i) for i in sa_layers]
  out.update(extra)
  return out


def router_histogram(summary: Mapping, families: Sequence[str]) -> dict:
  """{family: {budget label: count}} of a router run (its per-group budget histograms)."""
  return {f: dict(summary["per_group"][f]["budget_histogram"]) for f in families
          if f in summary["per_group"]}


def cell(s: Mapping | None) -> str:
  if not s or not s["n"]:
    return "–"
  return f"{100 * s['acc']:.1f} [{100 * s['lo']:.0f}, {100 * s['hi']:.0f}]"


def table_lines(rows: Sequence[Mapping], families: Sequence[str], *, costs: bool = False
                ) -> list[str]:
  """A markdown table of rows: method, setting, each family and 'hard' [95% interval]; with
  `costs` also LLM GFLOPs, the savings and the answer-token survival rate."""
  cols = list(families) + [HARD]
  extra = ["LLM GFLOPs", "LLM saving", "total saving", "answer token kept"] if costs else []
  lines = ["| method | setting | " + " | ".join(cols + extra) + " |",
           "|" + "---|" * (len(cols) + len(extra) + 2)]
  for r in rows:
    line = f"| {r['method']} | {r['setting']} | " + " | ".join(
        cell(r["families"].get(c)) for c in cols)
    if costs:
      kept = r.get("answer_token_kept")
      line += (f" | {r['llm_gflops']:.4f} | {r['llm_saving']:.2f}x | {r['total_saving']:.2f}x"
               if r.get("llm_gflops") is not None else " | – | – | –")
      line += f" | {'–' if kept is None else f'{100 * kept:.0f}%'}"
    lines.append(line + " |")
  return lines


def markdown(results: Mapping) -> str:
  """results.md: the table (accuracy % [95% interval]), n per column, the histogram, the
  controls and the notes."""
  fams = list(results["families"])
  cols = fams + [HARD]
  lines = [f"# {results.get('title', 'Results')}", "", results.get("preamble", ""), "",
           *table_lines(results["rows"], fams, costs=True)]
  ns = results["rows"][0]["families"] if results["rows"] else {}
  lines += ["", "n per column: " + ", ".join(f"{c} {ns[c]['n']}" for c in cols if c in ns),
            "", "chance: " + ", ".join(f"{f} {100 * s['chance']:.1f}%"
                                      for f, s in results["families"].items())]
  if results.get("router_histogram"):
    lines += ["", "## Router budgets per family", "",
              "| family | " + " | ".join(sorted({b for h in results["router_histogram"].values()
                                                  for b in h})) + " |"]
    budgets = sorted({b for h in results["router_histogram"].values() for b in h})
    lines.append("|" + "---|" * (len(budgets) + 1))
    for f, h in results["router_histogram"].items():
      lines.append(f"| {f} | " + " | ".join(str(h.get(b, 0)) for b in budgets) + " |")
  for title, text in results.get("sections", {}).items():
    lines += ["", f"## {title}", "", text]
  return "\n".join(lines) + "\n"


def plot(results: Mapping, path: str | os.PathLike) -> str:
  """Accuracy on the hard families vs LLM GFLOPs, one marker per method, 95% error bars."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  styles = {"base": ("k", "s"), "visor": ("tab:blue", "o"), "router": ("tab:red", "*"),
            "visor_tr": ("tab:purple", "D"), "fastv": ("tab:orange", "v"),
            "pyramiddrop": ("tab:green", "^"), "visionzip": ("tab:brown", "P")}
  fig, ax = plt.subplots(figsize=(7.5, 5))
  seen = set()
  for r in results["rows"]:
    if r["method"] not in styles or r.get("llm_gflops") is None:
      continue
    s = r["families"][HARD]
    colour, marker = styles[r["method"]]
    ax.errorbar(r["llm_gflops"], s["acc"], yerr=[[s["acc"] - s["lo"]], [s["hi"] - s["acc"]]],
                fmt=marker, color=colour, ms=12 if marker == "*" else 7, capsize=3,
                label=None if r["method"] in seen else r["method"])
    seen.add(r["method"])
    ax.annotate(r["setting"], (r["llm_gflops"], s["acc"]), textcoords="offset points",
                xytext=(5, 4), fontsize=7)
  ax.set_xlabel("LLM GFLOPs / sample (prefill)")
  ax.set_ylabel("accuracy on the hard families (95% interval)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return harness.save_figure(fig, path)


def write(results: Mapping, out_dir: str) -> dict[str, str]:
  """results.json, results.md, pareto.png under `out_dir` → their paths."""
  paths.makedirs(out_dir)
  written = {"json": harness.write_json(dict(results), paths.join(out_dir, "results.json")),
             "md": paths.join(out_dir, "results.md"),
             "plot": plot(results, paths.join(out_dir, "pareto.png"))}
  paths.write_text(written["md"], markdown(results))
  return written


def read(out_dir: str) -> dict:
  return json.loads(paths.read_text(paths.join(out_dir, "results.json")))
