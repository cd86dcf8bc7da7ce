"""The evaluation harness with a fake answer_fn: hand-checkable aggregation, skipped input,
result files, the Pareto plot and the feasible-budget frontier."""
import json

import numpy as np
import PIL.Image
import pytest

from visor_jax import budgets, config_lib, model_configs
from visor_jax.evaluation import harness

# id -> (prediction, sa_layers, llm_flops, total_flops); the expected scores are in comments.
FAKE = {"q1": ("Red.", [4, 1], 10.0, 30.0),      # exact_match "red": 1
        "q2": ("green", [], 2.0, 22.0),          # exact_match "blue": 0
        "q3": ("7.2", [1, 4], 10.0, 30.0),       # relaxed vs 7 (2.9% off): 1
        "q4": ("two", [1, 4, 7], 20.0, 40.0)}    # vqa_accuracy vs ten "2": 1


def _line(**kw):
  base = {"image": "img.png", "question": "q?", "metric": "exact_match"}
  return json.dumps({**base, **kw})


@pytest.fixture
def qfile(tmp_path):
  PIL.Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "img.png")
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  lines = [
      _line(id="q1", answers=["red"], dataset="A", tags=["easy"]),
      _line(id="q2", answers=["blue"], dataset="A", tags=["hard"]),
      "{this is not json",                                             # invalid_json
      _line(id="q3", answer="7", metric="relaxed_accuracy", dataset="B", tags=["easy", "chart"]),
      json.dumps({"id": "x1", "image": "img.png", "answers": ["a"], "metric": "anls"}),  # no q
      _line(id="x2", answers=["a"], metric="bleu"),                    # bad_field
      "",                                                              # blank: ignored
      _line(id="x3", image="missing.png", answers=["a"]),              # missing_image
      _line(id="x4", image="corrupt.png", answers=["a"]),              # corrupt_image
      _line(id="q4", answers=["2"] * 10, metric="vqa_accuracy"),       # dataset: file stem
  ]
  path = tmp_path / "vqa.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def fake_answer_fn(seen_batches):
  def answer_fn(items):
    seen_batches.append([it.id for it in items])
    assert all(isinstance(it.image, PIL.Image.Image) for it in items)  # decoded for the model
    return [FAKE[it.id] for it in items]
  return answer_fn


def test_load_questions_reports_and_skips(qfile):
  items, skips = harness.load_questions(qfile)
  assert [it.id for it in items] == ["q1", "q2", "q3", "x3", "x4", "q4"]
  assert dict(skips.counts) == {"invalid_json": 1, "missing_field": 1, "bad_field": 1}
  assert [e["source"] for e in skips.examples] == ["vqa.jsonl:3", "vqa.jsonl:5", "vqa.jsonl:6"]
  q4 = items[-1]
  assert q4.dataset == "vqa" and q4.tags == () and q4.answers == ("2",) * 10
  assert items[2].answers == ("7",) and items[2].tags == ("easy", "chart")
  # Paths stay as written, with the root they are read under (the file's directory).
  assert items[0].image == "img.png" and items[0].image_root == str(qfile.parent)


def test_run_eval_aggregates_by_dataset_and_tag(qfile):
  items, skips = harness.load_questions(qfile)
  seen = []
  r = harness.run_eval(items, fake_answer_fn(seen), batch_size=2, skips=skips)
  assert seen == [["q1", "q2"], ["q3"], ["q4"]]       # x3/x4 dropped from the 2nd batch
  assert r["kind"] == "router" and r["label"] == "router" and r["sa_layers"] is None
  assert r["n_scored"] == 4 and r["n_items"] == 9
  assert r["skipped"] == {"invalid_json": 1, "missing_field": 1, "bad_field": 1,
                          "missing_image": 1, "corrupt_image": 1, "unsafe_path": 0}
  assert {e["source"] for e in r["skipped_examples"]} >= {"vqa.jsonl:8", "vqa.jsonl:9"}
  assert dict(skips.counts) == {"invalid_json": 1, "missing_field": 1, "bad_field": 1}  # copied

  o = r["overall"]
  assert o["n"] == 4 and o["accuracy"] == pytest.approx(0.75)
  assert o["mean_llm_flops"] == pytest.approx(10.5) and o["mean_total_flops"] == pytest.approx(30.5)
  assert o["dataset_mean_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
  assert o["mean_sa_layers"] == pytest.approx((2 + 0 + 2 + 3) / 4)
  assert o["budget_histogram"] == {"SA{1,4}": 2, "CA-only": 1, "SA{1,4,7}": 1}

  a, b, v = (r["per_dataset"][d] for d in ("A", "B", "vqa"))
  assert (a["n"], a["accuracy"], a["mean_llm_flops"], a["mean_total_flops"]) == (2, 0.5, 6.0, 26.0)
  assert a["budget_histogram"] == {"CA-only": 1, "SA{1,4}": 1} and a["metrics"] == ["exact_match"]
  assert (b["n"], b["accuracy"], b["mean_llm_flops"]) == (1, 1.0, 10.0)
  assert b["metrics"] == ["relaxed_accuracy"]
  assert (v["n"], v["accuracy"], v["mean_total_flops"]) == (1, 1.0, 40.0)

  easy, hard, chart = (r["per_tag"][t] for t in ("easy", "hard", "chart"))
  assert set(r["per_tag"]) == {"easy", "hard", "chart"}
  assert (easy["n"], easy["accuracy"], easy["mean_llm_flops"]) == (2, 1.0, 10.0)
  assert (hard["n"], hard["accuracy"], hard["mean_total_flops"]) == (1, 0.0, 22.0)
  assert chart["n"] == 1 and chart["budget_histogram"] == {"SA{1,4}": 1}
  # Question groups: an item's first tag, else its dataset (no dataset-specific codes).
  assert set(r["per_group"]) == {"easy", "hard", "vqa"}
  assert r["per_group"]["easy"]["n"] == 2 and r["per_group"]["vqa"]["accuracy"] == 1.0

  s = {x["id"]: x for x in r["samples"]}
  assert s["q1"]["score"] == 1.0 and s["q1"]["sa_layers"] == [1, 4]
  assert s["q1"]["budget"] == "SA{1,4}"
  assert s["q2"]["prediction"] == "green" and s["q2"]["score"] == 0.0


def test_fixed_budget_run_and_flops_fn(qfile):
  items, _ = harness.load_questions(qfile)
  calls = []

  def flops_fn(item, sa_layers):
    calls.append((item.id, sa_layers))
    return 100.0 * len(sa_layers), 1000.0

  answer_fn = lambda batch: [("x", [7], None, None) for _ in batch]
  r = harness.run_eval(items, answer_fn, sa_layers=[7], flops_fn=flops_fn, keep_samples=False)
  assert r["kind"] == "fixed" and r["label"] == "SA{7}" and r["sa_layers"] == [7]
  assert "samples" not in r and r["n_scored"] == 4 and len(calls) == 4
  assert r["overall"]["mean_llm_flops"] == 100.0 and r["overall"]["mean_total_flops"] == 1000.0
  with pytest.raises(ValueError, match="no FLOPs"):
    harness.run_eval(items, answer_fn)
  with pytest.raises(ValueError, match="returned 0 answers"):
    harness.run_eval(items, lambda batch: [])


def test_odd_image_reference_is_skipped_not_fatal():
  item = harness.Item(id="z", dataset="d", question="q", answers=("a",), metric="exact_match",
                       image=12345)
  r = harness.run_eval([item], lambda batch: [("a", [], 1.0, 1.0)] * len(batch))
  assert r["n_scored"] == 0 and r["skipped"]["bad_field"] == 1
  assert np.isnan(r["overall"]["accuracy"])


def test_image_paths_are_confined_to_the_image_root(tmp_path):
  """A question file is untrusted input, like a training JSON: an absolute image path, a `..`
  out of the root and a symlink out of it are skipped as `unsafe_path` (never opened, never
  answered) and counted; with an explicit image root, paths resolve there instead."""
  root, outside = tmp_path / "bench", tmp_path / "elsewhere"
  root.mkdir(), outside.mkdir()
  for d in (root, outside):
    PIL.Image.new("RGB", (8, 6), (200, 10, 10)).save(d / "img.png")
  (root / "link.png").symlink_to(outside / "img.png")
  qfile = root / "q.jsonl"
  qfile.write_text("\n".join([
      _line(id="ok", answers=["red"]),
      _line(id="abs", image=str(outside / "img.png"), answers=["red"]),
      _line(id="up", image="../elsewhere/img.png", answers=["red"]),
      _line(id="link", image="link.png", answers=["red"]),
  ]) + "\n")
  items, skips = harness.load_questions(qfile)
  seen = []
  answer_fn = lambda batch: seen.extend(it.id for it in batch) or [("red", [], 1.0, 1.0)] * len(
      batch)
  r = harness.run_eval(items, answer_fn, skips=skips)
  assert seen == ["ok"] and r["n_scored"] == 1 and r["n_items"] == 4
  assert r["skipped"]["unsafe_path"] == 3
  assert {e["source"] for e in r["skipped_examples"]} == {"q.jsonl:2", "q.jsonl:3", "q.jsonl:4"}
  # An explicit root replaces the file's directory: "img.png" is the one there, a `..` that
  # comes back into it is fine, an absolute path is still refused.
  seen.clear()
  items, skips = harness.load_questions(qfile, image_root=outside)
  r = harness.run_eval(items, answer_fn, skips=skips)
  assert seen == ["ok", "up"]
  assert r["skipped"]["unsafe_path"] == 1 and r["skipped"]["missing_image"] == 1  # abs; link


def test_result_json_file(qfile, tmp_path):
  items, skips = harness.load_questions(qfile)
  r = harness.run_eval(items, fake_answer_fn([]), skips=skips)
  r["per_tag"]["empty"] = harness.summarize([])          # NaN accuracy -> null
  path = harness.write_json(r, tmp_path / "out" / "result.json")
  with open(path) as f:
    back = json.load(f)
  assert back["overall"]["accuracy"] == 0.75 and back["skipped"]["corrupt_image"] == 1
  assert back["per_dataset"]["A"]["budget_histogram"] == {"CA-only": 1, "SA{1,4}": 1}
  assert back["per_tag"]["empty"]["accuracy"] is None
  assert len(back["samples"]) == 4


# ----------------------------------------------------------------------------- frontier

HAND_TABLE = [
    {"sa_layers": [], "acc": 0.50, "llm_flops": 1.0, "total_flops": 11.0},
    {"sa_layers": [1], "acc": 0.60, "llm_flops": 2.0, "total_flops": 12.0},
    {"sa_layers": [4], "acc": 0.55, "llm_flops": 2.0, "total_flops": 10.5},   # same cost, worse
    {"sa_layers": [7], "acc": 0.58, "llm_flops": 2.5, "total_flops": 12.5},   # dominated by [1]
    {"sa_layers": [1, 4], "acc": 0.60, "llm_flops": 3.0, "total_flops": 13.0},  # not better
    {"sa_layers": [1, 4, 7], "acc": 0.70, "llm_flops": 4.0, "total_flops": 14.0},
    {"sa_layers": [1, 4, 7, 10], "acc": 0.69, "llm_flops": 5.0, "total_flops": 15.0},
]


def test_pareto_frontier_on_hand_table():
  front = harness.pareto_frontier(HAND_TABLE)
  assert [r["sa_layers"] for r in front] == [[], [1], [1, 4, 7]]
  gain = harness.pareto_frontier(HAND_TABLE, min_gain=0.15)
  assert [r["sa_layers"] for r in gain] == [[], [1, 4, 7]]
  by_total = harness.pareto_frontier(HAND_TABLE, cost_key="total_flops")
  assert [r["sa_layers"] for r in by_total] == [[4], [1], [1, 4, 7]]   # [4] is cheapest here
  assert harness.pareto_frontier(list(reversed(HAND_TABLE))) == front  # order-free


def test_feasible_file_roundtrip(tmp_path):
  table = harness.write_feasible(tmp_path / "feasible.json", HAND_TABLE)
  assert budgets.read_feasible(tmp_path / "feasible.json") == [[], [1], [1, 4, 7]]
  with open(tmp_path / "feasible.json") as f:
    data = json.load(f)
  assert data == table and data["cost_key"] == "llm_flops"
  assert [row["sa_layers"] for row in data["table"]] == [[], [1], [4], [7], [1, 4], [1, 4, 7],
                                                          [1, 4, 7, 10]]
  assert [row["on_frontier"] for row in data["table"]] == [True, True, False, False, False,
                                                            True, False]
  assert set(data["table"][0]) == {"sa_layers", "acc", "llm_flops", "total_flops", "on_frontier"}
  (tmp_path / "bad.json").write_text('{"feasible_budgets": []}')
  with pytest.raises(ValueError, match="feasible_budgets"):
    budgets.read_feasible(tmp_path / "bad.json")


def test_candidate_subsets():
  cfg = config_lib.model_config(model_configs.llava_ov_0_5b())
  cands = list(cfg.visor.sa_candidates)                         # 8 candidates
  subsets = harness.candidate_subsets(cands, max_count=1000)
  assert len(subsets) == 9 + (1 + 8 + 28) - 3                 # [], [22], [1,22] overlap
  assert len({tuple(s) for s in subsets}) == len(subsets)
  assert subsets[0] == [] and subsets[-1] == cands
  capped = harness.candidate_subsets(cands, max_count=20)
  assert len(capped) == 20
  assert all(budgets.spread_layers(cands, k) in capped for k in range(len(cands) + 1))
  assert harness.candidate_subsets(cands, max_count=5) == sorted(
      [budgets.spread_layers(cands, k) for k in range(9)], key=lambda s: (len(s), s))


# ----------------------------------------------------------------------------- suite and plot

def test_run_suite_writes_results_plot_and_frontier(qfile, tmp_path):
  items, skips = harness.load_questions(qfile)
  need = {"q1": 0, "q2": 1, "q3": 2, "q4": 3}   # SA layers an item needs to be answered right

  def make_answer_fn(sa_layers):
    def answer_fn(batch):
      out = []
      for it in batch:
        layers = [1, 4, 7][:need[it.id]] if sa_layers is None else sa_layers  # router: exact
        right = len(layers) >= need[it.id]
        pred = FAKE[it.id][0] if right else "wrong"
        out.append((pred, layers, 1e9 * (1 + len(layers)), 5e9 + 1e9 * len(layers)))
      return out
    return answer_fn

  out = tmp_path / "suite"
  summary = harness.run_suite(items, make_answer_fn, [[], [1], [1, 4], [1, 4, 7]], out,
                               skips=skips, batch_size=3)
  labels = [r["label"] for r in summary["runs"]]
  assert labels == ["CA-only", "SA{1}", "SA{1,4}", "SA{1,4,7}", "router"]
  accs = [r["overall"]["accuracy"] for r in summary["runs"]]
  # q2 was never right (its FAKE prediction is wrong): fixed 1/4, 1/4, 2/4, 3/4; router 3/4.
  assert accs == pytest.approx([0.25, 0.25, 0.5, 0.75, 0.75])
  router = summary["runs"][-1]["overall"]
  assert router["mean_llm_flops"] == pytest.approx(1e9 * (1 + 1.5))
  assert router["budget_histogram"] == {"CA-only": 1, "SA{1,4,7}": 1, "SA{1,4}": 1, "SA{1}": 1}
  assert budgets.read_feasible(out / "feasible.json") == [[], [1, 4], [1, 4, 7]]
  for name in ("results_CA-only.json", "results_SA_1_4_7.json", "results_router.json",
               "summary.json"):
    assert (out / name).is_file(), name
  with open(out / "summary.json") as f:
    assert [r["label"] for r in json.load(f)["runs"]] == labels
  png = out / "pareto.png"
  assert png.stat().st_size > 10_000
  with PIL.Image.open(png) as im:
    im.load()
    assert im.width > 1000 and im.height > 400                  # two panels
    assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20


def test_plot_single_panel(qfile, tmp_path):
  items, _ = harness.load_questions(qfile)
  r = harness.run_eval(items, fake_answer_fn([]))
  path = harness.plot_pareto([r], tmp_path / "p.png", x="total",
                              accuracy_key="dataset_mean_accuracy")
  with PIL.Image.open(path) as im:
    assert im.width < 1000
  with pytest.raises(ValueError, match="x="):
    harness.plot_pareto([r], tmp_path / "q.png", x="flops")


# ----------------------------------------------------------------------------- synthetic source

def test_items_from_synthetic_records(monkeypatch):
  from visor_jax.data import synthetic
  recs = [synthetic.generate_example(0, "test", i, 256, 384)[0] for i in range(4)]
  asked = []
  monkeypatch.setattr(synthetic, "records",
                      lambda split, data_dir, **kw: asked.append((split, data_dir, kw)) or recs)
  assert [it.id for it in harness.synthetic_items("/d", limit=3, seed=1)] == [
      r["id"] for r in recs[:3]]
  assert asked == [("test", "/d", {"seed": 1})]
  items = harness.items_from_synthetic(recs)
  for it, rec in zip(items, recs):
    assert it.id == rec["id"] and it.dataset == "synthetic" and it.metric == "exact_match"
    assert it.answers == (rec["answer"],) and it.tags == (rec["family"], rec["kind"])
    assert "<image>" not in it.question and it.question.endswith("?")
  answer_fn = lambda batch: [(it.answers[0].upper() + ".", [], 1.0, 2.0) for it in batch]
  r = harness.run_eval(items, answer_fn)                       # PNG bytes decode fine
  assert r["n_scored"] == 4 and r["overall"]["accuracy"] == 1.0
  assert set(r["per_tag"]) >= {rec["family"] for rec in recs}
