"""The reproduction: results.json's contract, the markdown and plot, and (slow) every stage
end to end at a tiny scale, resumable and deterministic."""
import json
import os

import numpy as np
import pytest

from visor_jax.data import curriculum, pages, sources
from visor_jax.evaluation import report

FAMILIES = {"coarse": {"kind": "coarse", "chance": 0.3},
            "fine": {"kind": "fine", "chance": 0.1},
            "interaction": {"kind": "interaction", "chance": 0.1}}


def _summary(accs, n=40, llm=2e9, total=3e9, hist=None):
  per = {f: {"accuracy": a, "n": n, "budget_histogram": hist or {"CA-only": n}}
         for f, a in accs.items()}
  return {"overall": {"mean_llm_flops": llm, "mean_total_flops": total, "mean_sa_layers": 1.0},
          "per_group": per}


def test_results_contract_markdown_and_plot(tmp_path):
  base = _summary({"coarse": 1.0, "fine": 0.9, "interaction": 0.8}, llm=8e9, total=9e9)
  visor = _summary({"coarse": 1.0, "fine": 0.85, "interaction": 0.1}, llm=2e9, total=3e9)
  rows = [report.row("base", "all layers SA", base, FAMILIES, base, sa_layers=[0, 1, 2]),
          report.row("visor", "CA-only", visor, FAMILIES, base, sa_layers=[]),
          report.row("fastv", "keep 0.5", visor, FAMILIES, base, answer_token_kept=0.5)]
  hist = report.router_histogram(_summary({"fine": 1, "interaction": 1}, hist={"SA{1}": 40}),
                                 list(FAMILIES))
  paths = report.write({"families": FAMILIES, "rows": rows, "router_histogram": hist},
                       str(tmp_path))
  data = report.read(str(tmp_path))
  assert data["families"] == FAMILIES
  r = data["rows"][1]
  assert {"method", "setting", "sa_layers", "families", "llm_gflops", "llm_saving",
          "total_saving"} <= set(r)
  assert r["llm_saving"] == pytest.approx(4.0) and r["total_saving"] == pytest.approx(3.0)
  fam = r["families"]["interaction"]
  assert set(fam) == {"acc", "lo", "hi", "n"} and fam["lo"] < 0.1 < fam["hi"] and fam["n"] == 40
  # "hard" pools the non-coarse families: (0.85 * 40 + 0.1 * 40) / 80.
  assert r["families"]["hard"]["acc"] == pytest.approx(0.475) and r["families"]["hard"]["n"] == 80
  assert data["router_histogram"] == {"fine": {"SA{1}": 40}, "interaction": {"SA{1}": 40}}
  md = open(paths["md"]).read()
  assert "| visor | CA-only | 100.0 [" in md and "| 50% |" in md and "n per column" in md
  assert os.path.getsize(paths["plot"]) > 1000


def _reproduce_config(arg=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "reproduce_config", os.path.join(os.path.dirname(__file__), "..", "configs", "reproduce.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_stages_chain_readout_lookup_relations_base_and_which_filter_families():
  """readout (1 x 1 pages) -> lookup (fine questions alone, one per record, on sparse then
  full pages) -> relations (every family, the relation questions on pages with 1, 2, 4, 8
  white digits) -> base -> stage1 -> ...: each starts from the one before; the base and later stages see every family on
  full pages; the hop loss is on from the relations on, except for VISOR-TR."""
  from visor_jax import reproduce
  rc = _reproduce_config()
  stages = reproduce.training_stages(rc)
  assert stages == ("readout", "lookup", "relations_1", "relations_2", "relations_4",
                    "relations_8", "base", "stage1", "stage2", "universal")
  c = {s: reproduce.stage_config(rc, s, "/w") for s in stages}
  assert [c[s].init_from for s in c] == ["", *(f"/w/{s}" for s in stages[:-1])]
  assert [c[s].data.pages_curriculum for s in c] == (
      ["", rc.lookup] + [f"all/{k}@control+interaction:{rc.steps.relations}"
                         for k in (1, 2, 4, 8)] + [""] * 4)
  assert rc.lookup.startswith("fine/1:") and rc.lookup.split(",")[-1].startswith("fine:")
  assert [c[s].hop_loss.weight for s in c] == [0, 0] + [rc.hop_weight] * 8
  assert [c[s].num_steps for s in c][1:6] == [
      curriculum.total_steps(curriculum.parse(rc.lookup)), *[rc.steps.relations] * 4]
  for s in stages:
    curriculum.check(c[s])   # each stage's curriculum spans its steps
  assert [c[s].data.pages_readout for s in c] == [True] + [False] * 9
  assert c["lookup"].data.pages_turns == 1 and c["base"].data.pages_turns == rc.turns
  assert {c[s].budgets for s in stages[:7]} == {"all"}
  assert (c["stage1"].budgets, c["stage2"].budgets) == ("default", "maximal") == (
      rc.stage1_budgets, "maximal")
  tr = reproduce.stage_config(rc, "visor_tr_25", "/w")
  assert (tr.visor_tr_keep, tr.init_from, tr.num_steps) == (0.25, "/w/universal",
                                                           rc.steps.visor_tr)
  assert tr.hop_loss.weight == 0
  assert sources.pages_params(c["base"].data)["families"] == pages.FAMILIES


@pytest.mark.slow
def test_reproduction_runs_every_stage_and_resumes(tmp_path):
  from visor_jax import reproduce
  rc = _reproduce_config("scale=tiny")
  lines = []
  first = reproduce.reproduce(rc, str(tmp_path), print_fn=lines.append)
  for stage in reproduce.training_stages(rc) + ("search", "router", "visor_tr_50"):
    assert os.path.exists(tmp_path / stage / reproduce.DONE), stage
  # The hop loss trains from the relation stages on, and is logged.
  logged = [json.loads(l) for l in (tmp_path / "relations_2" / "metrics.jsonl").open()]
  assert any(np.isfinite(r.get("hop_loss", np.nan)) for r in logged)
  assert not any("hop_loss" in l for l in (tmp_path / "lookup" / "metrics.jsonl").open())
  methods = {r["method"] for r in first["rows"]}
  assert methods == {"base", "fastv", "pyramiddrop", "visionzip", "visor", "router", "visor_tr",
                     "question_only"}
  assert set(first["families"]) == {"coarse", "fine", "control", "interaction"}
  for r in first["rows"]:
    assert set(r["families"]) == set(first["families"]) | {"hard"}
    if r["method"] in ("fastv", "pyramiddrop", "visionzip"):
      assert 0.0 <= r["answer_token_kept"] <= 1.0
  base = next(r for r in first["rows"] if r["method"] == "base")
  assert base["llm_saving"] == pytest.approx(1.0)
  saved = json.loads((tmp_path / "results" / "results.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(first["rows"]))
  assert (tmp_path / "results" / "results.md").exists()
  assert (tmp_path / "results" / "pareto.png").exists()
  # A rerun skips every finished stage and writes the same table.
  again = reproduce.reproduce(rc, str(tmp_path), print_fn=lines.append)
  assert json.loads(json.dumps(again["rows"])) == saved["rows"]


def test_learnability_gate_measures_what_it_says():
  """The gate's pieces at 2 steps: chance-level accuracy with its interval, an image effect
  and attention in range, and a probe that reads the digits from the visual tokens (they are
  readable even at initialisation: one patch per cell)."""
  from visor_jax.benchmarks import learnability_gate as gate
  r = gate.run(grid=4, num_steps=2, lr=1e-3, batch_size=8, eval_items=32, probe_batches=12,
               warmup=1, digits=3)
  assert r["n"] == 32 and (r["warmup"], r["digits"]) == (1, 3) and 0 <= r["lo"] <= r["tf_exact"] <= r["hi"] <= 1
  assert r["image_effect"] > 0 and 0 <= r["on_cell"] <= 1 and r["uniform"] == 1 / 21
  assert r["probe"] > 0.9
  assert "tf_exact [95%]" in gate.format_table([r])


def test_learnability_gate_pages_hold_the_asked_digit():
  """`digits` coloured digits in distinct cells; the one asked is drawn where `page` says, in
  its colour (read back from the pixels), and every other ink is another colour."""
  import io
  from PIL import Image
  from visor_jax.benchmarks import learnability_gate as gate
  from visor_jax.data import pages
  rng = np.random.default_rng(0)
  for grid, digits in [(1, 1), (4, 3), (2, 9)]:
    png, colour, digit, (r, c) = gate.page(rng, grid, digits)
    img = np.asarray(Image.open(io.BytesIO(png)))
    cell = img[r * pages.CELL:(r + 1) * pages.CELL, c * pages.CELL:(c + 1) * pages.CELL]
    ink = np.all(cell == pages.COLOURS[colour], -1)
    np.testing.assert_array_equal(ink, pages.GLYPHS[digit])
    assert np.all(img == pages.COLOURS[colour], -1).sum() == ink.sum()  # colour is unique
    inked = ~np.all(img == pages.PAGE_COLOURS["black"], -1)
    n_cells = sum(bool(inked[i:i + pages.CELL, j:j + pages.CELL].any())
                  for i in range(0, img.shape[0], pages.CELL)
                  for j in range(0, img.shape[1], pages.CELL))
    assert n_cells == min(digits, grid * grid)
