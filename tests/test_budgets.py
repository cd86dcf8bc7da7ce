"""The budget vocabulary (budgets.py): spellings, parsing, validation, feasible files."""
import json

import numpy as np
import pytest

from visor_jax import budgets


def test_mask_and_layers_round_trip(cfg):
  m = budgets.mask(cfg, [4, 1], batch=3)
  assert m.shape == (3, cfg.num_layers) and m.dtype == bool
  assert budgets.layers_of(m[0]) == [1, 4]
  assert budgets.layers_of(budgets.all_sa(cfg)[0]) == list(range(cfg.num_layers))
  assert budgets.layers_of(budgets.ca_only(cfg)[0]) == []
  with pytest.raises(ValueError, match="out of range"):
    budgets.mask(cfg, [cfg.num_layers])


def test_labels():
  assert budgets.label([4, 1]) == "SA{1,4}" and budgets.label([]) == "CA-only"
  assert budgets.file_label([1, 4]) == "SA_1_4" and budgets.file_label("CA-only") == "CA-only"
  assert budgets.file_label("router") == "router"


@pytest.mark.parametrize("text, want", [
    (None, None), ("", None), ("[]", []), ("none", []), ("CA-only", []), ("1,4", [1, 4]),
    ("[4, 1]", [1, 4]), ("all", "all"), ("maximal", "maximal")])
def test_parse(text, want):
  assert budgets.parse(text) == want


def test_parse_rejects_garbage():
  with pytest.raises(ValueError, match="expected"):
    budgets.parse("one,four")


def test_validate_names_the_field_and_the_reason(cfg):
  # tiny: CA layers {0, 3}, SA candidates {1, 4}
  assert budgets.validate(cfg, [4, 1]) == [1, 4]
  with pytest.raises(ValueError, match=r"budgets\[1\].*\[2\].*not SA candidates"):
    budgets.validate_sets(cfg, [[1], [2]], "budgets")
  with pytest.raises(ValueError, match=r"\[3\] are CA layers"):
    budgets.validate(cfg, [3], "--sa_layers")
  with pytest.raises(ValueError, match="duplicate"):
    budgets.validate(cfg, [1, 1])
  with pytest.raises(ValueError, match="duplicate budgets"):
    budgets.validate_sets(cfg, [[1], [1]])
  with pytest.raises(ValueError, match="empty"):
    budgets.validate_sets(cfg, [])
  everything = list(range(cfg.num_layers))
  with pytest.raises(ValueError, match="not SA candidates"):
    budgets.validate(cfg, everything)
  assert budgets.validate(cfg, everything, allow_all=True) == everything


def test_resolve_every_spelling(cfg, tmp_path):
  assert budgets.resolve(None, cfg) == budgets.resolve("default", cfg) == [[], [4], [1, 4]]
  assert budgets.resolve("maximal", cfg) == [[1, 4]]
  assert budgets.resolve("[];[4];[1,4]", cfg) == [[], [4], [1, 4]]
  assert budgets.resolve([[4], []], cfg) == [[4], []]
  assert budgets.resolve("all;[]", cfg, allow_all=True) == [list(range(cfg.num_layers)), []]
  path = tmp_path / "feasible.json"
  budgets.write_feasible(path, [[], [1, 4]], note="x")
  assert json.loads(path.read_text())["note"] == "x"
  assert budgets.resolve(str(path), cfg) == [[], [1, 4]]
  budgets.write_feasible(path, [[2]])
  with pytest.raises(ValueError, match=r"feasible.json.*not SA candidates"):
    budgets.resolve(str(path), cfg, "router_train.feasible")
  with pytest.raises(ValueError, match="no file"):
    budgets.resolve(str(tmp_path / "missing.json"), cfg)
  with pytest.raises(ValueError, match="not a list of layers"):
    budgets.resolve("[1];all", cfg)


def test_resolve_one(cfg):
  assert budgets.resolve_one(cfg, None) is None
  assert budgets.resolve_one(cfg, "maximal") == [1, 4]
  assert budgets.resolve_one(cfg, "all") == list(range(cfg.num_layers))
  assert budgets.resolve_one(cfg, "[4]") == [4]
  with pytest.raises(ValueError, match="sa_layers"):
    budgets.resolve_one(cfg, [2])


def test_check_mask(cfg):
  budgets.check_mask(cfg, budgets.mask(cfg, [1], 2), 2)
  with pytest.raises(ValueError, match="expected dtype bool"):
    budgets.check_mask(cfg, np.zeros((2, cfg.num_layers), np.int32), 2)
  with pytest.raises(ValueError, match="one bit per LLM layer"):
    budgets.check_mask(cfg, np.zeros((2, 3), bool), 2)


def test_read_feasible_errors(tmp_path):
  (tmp_path / "a.json").write_text("{not json")
  with pytest.raises(ValueError, match="not JSON"):
    budgets.read_feasible(tmp_path / "a.json")
  (tmp_path / "b.json").write_text(json.dumps({"feasible_budgets": []}))
  with pytest.raises(ValueError, match="non-empty"):
    budgets.read_feasible(tmp_path / "b.json")


def test_sample_is_pure_in_seed_and_step():
  sets = [[], [4], [1, 4]]
  a = [budgets.sample(sets, None, 0, s) for s in range(50)]
  assert a == [budgets.sample(sets, None, 0, s) for s in range(50)]
  assert set(a) == {0, 1, 2}
  assert {budgets.sample(sets, [0, 0, 1], 0, s) for s in range(20)} == {2}
  with pytest.raises(ValueError, match="budget_weights"):
    budgets.sample(sets, [1, 1], 0, 0)
