"""The pages curriculum (data/curriculum.py): phases parsed, checked against num_steps, and read
in order by the training pipeline, each phase's records those of its own pages build."""
import ml_collections
import numpy as np
import pytest

from visor_jax import config_lib
from visor_jax.data import curriculum, pages, pages_build, sources
from visor_jax.data.tokenizer import build_tiny_tokenizer
from visor_jax.training import config as train_config

FCI = ("fine", "control", "interaction")


def test_parse_reads_every_kind_of_phase():
  phases = curriculum.parse("readout:3, fine:5,fine+control+interaction/2:4,all/8@interaction:2,"
                            "all:1")
  assert phases == (curriculum.Phase(3, readout=True), curriculum.Phase(5, families=("fine",)),
                    curriculum.Phase(4, families=FCI, white_digits=2),
                    curriculum.Phase(2, white_digits=8, sparse_families=("interaction",)),
                    curriculum.Phase(1))
  assert [p.label for p in phases] == ["readout", "fine", "fine+control+interaction/2",
                                       "all/8@interaction", "all"]
  assert curriculum.total_steps(phases) == 15
  assert curriculum.parse("") == ()


@pytest.mark.parametrize("text,match", [
    ("fine", "WHAT:STEPS"), ("fine:0", "WHAT:STEPS"), ("fine:x", "WHAT:STEPS"),
    ("readout/2:5", "readout pages are 1 x 1"), ("all/0:5", "positive integer"),
    ("all/x:5", "positive integer"), ("colour:5", "colour"), ("all/2@:5", "after '@'"),
    ("all/2@fine+size:5", "size")])
def test_parse_names_the_bad_phase(text, match):
  with pytest.raises(ValueError, match=match):
    curriculum.parse(text)


def _config(text: str, num_steps: int, source: str = "pages") -> ml_collections.ConfigDict:
  c = train_config.pages(6, turns=1)
  c.data.source, c.data.pages_curriculum, c.num_steps = source, text, num_steps
  return c


def test_check_wants_pages_and_exactly_num_steps():
  assert len(curriculum.check(_config("readout:2,all:3", 5))) == 2
  assert curriculum.check(_config("", 7)) == ()
  with pytest.raises(ValueError, match="spans 5 steps but num_steps=6"):
    curriculum.check(_config("readout:2,all:3", 6))
  with pytest.raises(ValueError, match="source='pages'"):
    curriculum.check(_config("all:3", 3, source="synthetic"))


def test_concatenated_indexes_across_parts():
  c = curriculum.Concatenated([[0, 1], [], [2, 3, 4]])
  assert len(c) == 5 and list(c) == [0, 1, 2, 3, 4]
  assert c[4] == 4 and c[2] == 2
  for bad in (5, -1):
    with pytest.raises(IndexError):
      c[bad]


def test_train_batches_follow_the_phases_in_order(tmp_path):
  """Steps 0-1 read 1 x 1 pages, 2-3 sparse fine-only pages (one white digit), step 4 full
  pages of every family; each phase's records are its own build's, in build order, and the
  validation split stays the full pages."""
  c = _config("readout:2,fine/1:2,all:1", 5)
  c.data.batch_size, c.data.synthetic_dir = 4, str(tmp_path)
  c.data.synthetic_sizes = dict(train=8, validation=8, test=8)
  source = sources.source_for(c.data, "train", str(tmp_path))
  assert len(source) == 5 * 4
  assert source[0]["conversations"] == pages.readout_example(0, "train", 0)[0]["conversations"]
  first_fine = pages.family_index(0, "train", 0, ("fine",))
  assert source[8]["conversations"] == pages.generate_example(
      0, "train", first_fine, grid=6, white_digits=1)[0]["conversations"]
  assert source[16]["id"] == pages.generate_example(0, "train", 0, grid=6)[0]["id"]
  validation = sources.source_for(c.data, "validation", str(tmp_path))
  assert validation[0]["conversations"] == pages.generate_example(
      0, "validation", 0, grid=6)[0]["conversations"]

  cfg = config_lib.model_config(c.model)
  tokenizer = build_tiny_tokenizer(pages.corpus(), vocab_size=cfg.image_token_id)
  it = sources.train_iterator(c, cfg, tokenizer, str(tmp_path))
  batches = [next(it) for _ in range(5)]
  visual = [b["vis_valid"].sum(-1) for b in batches]
  assert all((v <= 3).all() for v in visual[:2])           # 1 x 1 pages: base, cell, newline
  assert all((v == 1 + 6 * 7).all() for v in visual[2:])   # 6 x 6 pages: 43 tokens
  assert all(set(b["group"]) == {"fine"} for b in batches[2:4])
  fine = [r["conversations"] for r in (source[i] for i in range(8, 16))]
  assert [pages_build.records("train", str(tmp_path), **curriculum.phase_params(
      sources.pages_params(c.data), curriculum.parse("fine/1:2")[0], 8))[i]["conversations"]
          for i in range(8)] == fine
  assert np.isin(np.asarray(batches[4]["group"]), pages.FAMILIES).all()


def test_sparse_families_thin_only_their_own_questions(tmp_path):
  """`all/2@interaction`: interaction questions on pages with two white digits, every other
  family on its full page; the build's name records it, so builds never collide."""
  params = dict(seed=0, sizes=dict(train=40, validation=0, test=0), grid=6, white_digits=2,
                sparse_families=("interaction",))
  assert pages_build.make_config(**params).name.endswith("-white2-thin-interaction")
  pages_build.build(tmp_path, **params)
  got = pages_build.records("train", tmp_path, **params)
  for i in range(40):
    family = pages.slot(0, "train", i)[0]
    want = pages.generate_example(0, "train", i, grid=6,
                                  white_digits=2 if family == "interaction" else 0)[0]
    assert got[i]["family"] == family and got[i]["image"] == want["image"], i
