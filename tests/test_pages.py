"""Pages dataset: answers read back from pixels, determinism, balance, record contract, and
the `pages` model geometry (one visual token per cell, pure-gather packing)."""
import collections
import io
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from visor_jax import config_lib, model_configs
from visor_jax.data import inputs, pages, pages_build, pipeline, preprocess, sources
from visor_jax.data.tokenizer import build_tiny_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = {"train": 80, "validation": 8, "test": 8}
PARAMS = dict(seed=0, sizes=SIZES, grid=8)
KEYS = {"id", "image", "conversations", "family", "kind", "answer"}
CELL = pages.CELL

# A CLI build in a fresh process (another protobuf map hash seed), sockets disabled; checks
# TensorFlow is never imported.
_SUBPROCESS = r"""
import runpy, socket, sys
def _no_network(*a, **k):
  raise OSError("network access attempted")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = _no_network
sys.argv = ["pages", "--data_dir", sys.argv[1], "--train", "80", "--validation", "8",
            "--test", "8"]
runpy.run_module("visor_jax.data.pages_build", run_name="__main__")
assert "tensorflow" not in sys.modules, "tensorflow was imported"
print("SUBPROCESS_OK")
"""


def _files(data_dir):
  return {p.relative_to(data_dir): p.read_bytes()
          for p in sorted(pathlib.Path(data_dir).rglob("*.array_record*"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Builds: a and b (same parameters; b through the CLI in a subprocess), c (seed 1),
  p (the row-permuted variant of a), all in one directory except b."""
  a = tmp_path_factory.mktemp("pages_a")
  b = tmp_path_factory.mktemp("pages_b")
  pages_build.build(a, **PARAMS)
  pages_build.build(a, **{**PARAMS, "seed": 1})
  pages_build.build(a, **PARAMS, permute_rows=True)
  proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(b)], capture_output=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, timeout=120)
  assert proc.returncode == 0 and "SUBPROCESS_OK" in proc.stdout, proc.stdout + proc.stderr
  return a, b, proc.stdout


def _split(data_dir, split, **overrides):
  return list(pages_build.records(split, data_dir, **{**PARAMS, **overrides}))


# ----------------------------------------------------------------------------- pixels -> answer


def decode(png: bytes):
  """(page colour, grid of (kind, value, colour)) read from the pixels alone."""
  rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  assert rgb.shape[0] == rgb.shape[1] and rgb.shape[0] % CELL == 0
  counts = {name: int(np.all(rgb == c, axis=-1).sum()) for name, c in pages.PAGE_COLOURS.items()}
  page = max(counts, key=counts.get)
  ink = {pages.WHITE: "white", **{v: k for k, v in pages.COLOURS.items()}}
  shapes = [("block", "", pages.BLOCK)] + [("digit", d, m) for d, m in pages.GLYPHS.items()]
  shapes += [("marker", s, m) for s, m in pages.MARKERS.items()]
  n = rgb.shape[0] // CELL
  grid = [[None] * n for _ in range(n)]
  for r in range(n):
    for c in range(n):
      cell = rgb[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].reshape(-1, 3)
      fg = ~np.all(cell == pages.PAGE_COLOURS[page], axis=-1)
      if not fg.any():   # an empty cell (sparse curriculum pages only)
        grid[r][c] = ("empty", "", "")
        continue
      colours = {tuple(int(v) for v in px) for px in cell[fg]}
      assert len(colours) == 1 and next(iter(colours)) in ink, (r, c, colours)  # no blending
      match = [(k, v) for k, v, m in shapes if np.array_equal(fg.reshape(CELL, CELL), m)]
      assert len(match) == 1, (r, c)
      grid[r][c] = (*match[0], ink[next(iter(colours))])
  return page, grid


def _cells(grid, kind, value=None, colour=None):
  return [(r, c) for r, row in enumerate(grid) for c, (k, v, col) in enumerate(row)
          if k == kind and (value is None or v == value) and (colour is None or col == colour)]


def _check_page(grid):
  """The page is well formed: one marker, one coloured digit, 2x2 blocks apart."""
  markers = [grid[r][c][1:] for r, c in _cells(grid, "marker")]
  assert len(markers) == pages.MARKERS_PER_PAGE == 1
  coloured = [grid[r][c][2] for r, c in _cells(grid, "digit") if grid[r][c][2] != "white"]
  assert len(coloured) == pages.COLOURED_DIGITS_PER_PAGE == 1
  blocks = {}
  for r, c in _cells(grid, "block"):
    blocks.setdefault(grid[r][c][2], []).append((r, c))
  for cells in blocks.values():  # one 2x2 square per colour
    (r0, c0) = min(cells)
    assert sorted(cells) == [(r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)]
  for (ra, ca), (rb, cb) in ((x, y) for x in _cells(grid, "block") for y in _cells(grid, "block")):
    if abs(ra - rb) + abs(ca - cb) == 1:  # edge-adjacent block cells belong to one block
      assert grid[ra][ca][2] == grid[rb][cb][2]
  return len(blocks)


def read_answer(question: str, page: str, grid) -> str:
  """The answer recomputed from the decoded page and the question text only."""
  n_blocks = _check_page(grid)
  if question == "What colour is the page?":
    return page
  if question == "How many big blocks are there?":
    return str(n_blocks)
  if m := re.fullmatch(r"Is there a big (\w+) block\?", question):
    return "yes" if _cells(grid, "block", colour=m[1]) else "no"
  if m := re.fullmatch(r"What is the (\w+) digit\?", question):
    (r, c), = _cells(grid, "digit", colour=m[1])
    return grid[r][c][1]
  m = re.fullmatch(r"What digit is (left of|right of|above|below) the (\w+) (\w+)\?", question)
  (r, c), = _cells(grid, "marker", value=m[3], colour=m[2])
  dr, dc = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[m[1]]
  kind, value, colour = grid[r + dr][c + dc]
  assert r + dr >= 0 and c + dc >= 0 and (kind, colour) == ("digit", "white")
  return value


def _question(rec):
  human, gpt = rec["conversations"]
  assert gpt == {"from": "gpt", "value": rec["answer"]}
  return human["value"].removeprefix("<image>\n")


def test_answers_read_back_from_pixels(built):
  a, _, _ = built
  seen = collections.Counter()
  for split in pages.SPLITS:
    for i, rec in enumerate(_split(a, split)):
      assert rec == pages.generate_example(0, split, i)[0]  # stored = the pure generator
      page, grid = decode(rec["image"])
      assert rec["answer"] == read_answer(_question(rec), page, grid), (split, i)
      seen[rec["family"]] += 1
  assert all(seen[f] >= 20 for f in pages.FAMILIES), seen


def test_permuted_variant_follows_the_new_layout(built):
  a, _, _ = built
  changed = 0
  for split in pages.SPLITS:
    for i, (rec, perm) in enumerate(zip(_split(a, split), _split(a, split, permute_rows=True))):
      view = pages.generate_example(0, split, i, permute_rows=True)[1]
      assert perm == pages.generate_example(0, split, i, permute_rows=True)[0]
      assert perm["id"] == rec["id"] and _question(perm) == _question(rec)
      # Same page, its 14 px rows of cells shuffled.
      img = np.asarray(Image.open(io.BytesIO(rec["image"])))
      bands = img.reshape(-1, CELL, *img.shape[1:])
      shown = np.asarray(Image.open(io.BytesIO(perm["image"])))
      assert sorted(view["rows"]) != view["rows"] and sorted(view["rows"]) == list(range(8))
      assert np.array_equal(shown, bands[view["rows"]].reshape(img.shape))
      page, grid = decode(perm["image"])
      assert perm["answer"] == read_answer(_question(perm), page, grid), (split, i)
      if rec["family"] == "interaction":
        assert perm["answer"] != rec["answer"]  # the neighbour moved: the label follows it
        changed += 1
      else:
        assert perm["answer"] == rec["answer"]
  assert changed >= 20


@pytest.mark.parametrize("grid", [4, 6, 12])
def test_other_grids(grid):
  for i in range(12):
    rec, view = pages.generate_example(3, "train", i, grid=grid)
    assert Image.open(io.BytesIO(rec["image"])).size == (grid * CELL, grid * CELL)
    for r in (rec, pages.generate_example(3, "train", i, grid=grid, permute_rows=True)[0]):
      page, cells = decode(r["image"])
      assert r["answer"] == read_answer(_question(r), page, cells)
  with pytest.raises(ValueError):
    pages.generate_example(0, "train", 0, grid=3)


def test_sparse_pages_keep_the_answer_and_k_white_digits():
  """The relation curriculum's pages: the same spec with only k white digits left; every
  answer still read back from the pixels; the main question's answer unchanged."""
  for k in (1, 2, 4):
    for i in range(16):
      full, _ = pages.generate_example(0, "train", i, grid=6)
      rec, view = pages.generate_example(0, "train", i, grid=6, white_digits=k, turns=3)
      assert rec["conversations"][:2] == full["conversations"] and rec["answer"] == full["answer"]
      page, grid = decode(rec["image"])
      assert sum(x == ("digit", x[1], "white") for row in grid for x in row) == k
      assert sum(x[0] == "empty" for row in grid for x in row) > 0
      for q, a in zip(rec["conversations"][::2], rec["conversations"][1::2]):
        assert a["value"] == read_answer(q["value"].removeprefix("<image>\n"), page, grid)
      if view["answer_cell"] is not None:   # the answer cell keeps its digit
        r, c = view["answer_cell"]
        assert grid[r][c][0] == "digit"
  assert pages.generate_example(0, "train", 3, grid=6, white_digits=2) == pages.generate_example(
      0, "train", 3, grid=6, white_digits=2)
  with pytest.raises(ValueError, match="permute_rows"):
    pages.generate_example(0, "train", 0, white_digits=2, permute_rows=True)
  assert pages_build.make_config(**PARAMS, white_digits=2).name.endswith("-white2")


def test_bitmaps_are_distinct():
  masks = [pages.BLOCK, *pages.GLYPHS.values(), *pages.MARKERS.values()]
  assert len({m.tobytes() for m in masks}) == len(masks) == 15
  assert all(m.shape == (CELL, CELL) and m.any() for m in masks)


# ----------------------------------------------------------------------------- determinism


def test_builds_are_byte_identical_across_processes(built):
  a, b, out = built
  fa, fb = _files(a), _files(b)
  name = pages_build.make_config(**PARAMS).name
  fa = {k: v for k, v in fa.items() if k.parts[1] == name}
  assert len(fa) == 3 and fa.keys() == fb.keys()
  assert all(fa[k] == fb[k] for k in fa)
  assert "train: 80 examples" in out and "->" in out


def test_seed_and_variant_change_the_data(built):
  a, _, _ = built
  base = [r["image"] for r in _split(a, "train")]
  assert base != [r["image"] for r in _split(a, "train", seed=1)]
  assert base != [r["image"] for r in _split(a, "train", permute_rows=True)]
  names = {p.name for p in (pathlib.Path(a) / "visor_pages_vqa").iterdir()}
  assert names == {pages_build.make_config(**PARAMS).name,
                   pages_build.make_config(**{**PARAMS, "seed": 1}).name,
                   pages_build.make_config(**PARAMS, permute_rows=True).name}
  with pytest.raises(FileNotFoundError):
    pages_build.records("train", a, **{**PARAMS, "grid": 6})


def test_generate_example_is_pure():
  a, view = pages.generate_example(5, "test", 17)
  b, view2 = pages.generate_example(5, "test", 17)
  assert a == b and view == view2
  pages.generate_example(5, "test", 18)  # other examples do not disturb it
  assert pages.generate_example(5, "test", 17)[0] == a
  assert pages.generate_example(5, "validation", 17)[0]["image"] != a["image"]


# ----------------------------------------------------------------------------- balance / text


def test_families_and_answers_are_balanced():
  """Every aligned run of 40 examples: 10 per family, digit answers 0-9 once per family,
  coarse answers once per (kind, answer) slot."""
  for start in (0, 40):
    recs = [pages.generate_example(0, "train", i)[0] for i in range(start, start + 40)]
    by_family = collections.defaultdict(list)
    for r in recs:
      by_family[r["family"]].append(r)
    assert {f: len(v) for f, v in by_family.items()} == {f: 10 for f in pages.FAMILIES}
    for f in ("fine", "control", "interaction"):
      assert sorted(r["answer"] for r in by_family[f]) == [str(d) for d in range(10)]
    assert sorted((r["kind"], r["answer"]) for r in by_family["coarse"]) == sorted(
        pages.coarse_slots(8))
  kinds = collections.Counter(pages.generate_example(0, "train", i)[0]["kind"]
                              for i in range(80))
  assert set(kinds) == {*pages.FAMILY_KINDS["coarse"], "colour_digit", "right", "below"}, kinds


def test_corpus_covers_text_and_answers_are_single_tokens(built):
  a, _, _ = built
  corpus = set(pages.corpus())
  for split in pages.SPLITS:
    for r in _split(a, split) + _split(a, split, permute_rows=True):
      assert _question(r) in corpus and r["answer"] in corpus
  tok = build_tiny_tokenizer(pages.corpus(), vocab_size=model_configs.pages().image_token_id)
  answers = [*pages.PAGE_COLOURS, "yes", "no", *(str(d) for d in range(10))]
  assert all(len(tok.encode(x)) == 1 for x in answers)
  # Every word of every question is one token too (a question is ~8 tokens, not ~20).
  for q in corpus:
    if q.endswith("?") or q == pages.READ_QUESTION:
      assert len(tok.encode(q)) == len(q.split()) + 1, q  # the words and the final mark


def test_train_turns_are_well_posed_and_read_back_from_pixels():
  """Extra question turns and the "Read the page." turn (train split only): every answer is
  the one the pixels give; the first question turn is exactly the evaluation format."""
  for i in range(12):
    plain, _ = pages.generate_example(0, "train", i, grid=6)
    rec, view = pages.generate_example(0, "train", i, grid=6, read_turn=True, turns=5)
    page, grid = decode(rec["image"])
    turns = rec["conversations"]
    if i % 2 == 0:   # the read turn opens even records, then the original question
      assert turns[0]["value"] == "<image>\n" + pages.READ_QUESTION
      rows = [r.replace("\n", "") for r in turns[1]["value"].split("\n")]
      assert rows == ["".join(v if k == "digit" else "-" for k, v, _ in row) for row in grid]
      assert turns[2]["value"] == plain["conversations"][0]["value"].removeprefix("<image>\n")
      turns = turns[2:]
    else:
      assert turns[:2] == plain["conversations"]
    assert len(turns) == 2 * 5 and rec["answer"] == turns[1]["value"]
    questions = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
    assert len(set(questions)) == len(questions)
    for q, a in zip(questions, turns[1::2]):
      assert a["value"] == read_answer(q, page, grid), q
  # Evaluation splits never get either.
  rec, _ = pages.generate_example(0, "validation", 0, grid=6, read_turn=True, turns=5)
  assert len(rec["conversations"]) == 2


def test_record_contract(built):
  a, _, _ = built
  for split in pages.SPLITS:
    recs = _split(a, split)
    assert len(recs) == SIZES[split]
    for i, r in enumerate(recs):
      assert set(r) == KEYS and r["id"] == f"{split}-{i:06d}"
      assert isinstance(r["image"], bytes) and r["image"][:8] == b"\x89PNG\r\n\x1a\n"
      assert r["conversations"][0]["from"] == "human"
      assert r["conversations"][0]["value"].startswith("<image>\n")
      assert r["kind"] in pages.FAMILY_KINDS[r["family"]]
      assert all(isinstance(r[k], str) for k in ("id", "family", "kind", "answer"))
  recs = pages_build.records("train", a, **PARAMS)
  assert recs[-1] == recs[79] and recs[1:3] == [recs[1], recs[2]]
  with pytest.raises(IndexError):
    recs[80]


# ----------------------------------------------------------------------------- model + wiring


def test_pages_geometry_packs_cells_as_a_pure_gather():
  cfg = config_lib.model_config(model_configs.get("pages"))
  assert cfg.vision.image_size == cfg.vision.patch_size == CELL
  ca, sa = cfg.visor.ca_layers, cfg.visor.sa_candidates
  assert ca == (0, 3) and sa == (1, 4) and cfg.text.num_layers == 6
  assert 3 * len(ca) < 8 + 1  # chained positional-conv reach < the row stride
  assert pipeline.visual_limits(cfg) == (73, 65)
  rec, view = pages.generate_example(0, "test", 2)
  image = Image.open(io.BytesIO(rec["image"]))
  sample = inputs.build_sample([1, cfg.image_token_id, 2], [image], cfg)
  assert sample.num_visual_tokens == 73 and len(sample.pixels) == 65
  newline = np.zeros(73, bool)
  newline[1 + 9 * np.arange(8) + 8] = True
  assert np.array_equal(sample.vis_newline, newline)
  w = sample.vis_weight[~newline]
  assert np.all(w[:, 0] == 1) and np.all(w[:, 1:] == 0)  # one-hot: no interpolation
  cells = [(r, c) for r in range(8) for c in range(8)]
  tokens = [pages.visual_token(8, rc) for rc in cells]
  assert np.array_equal(sample.vis_src[tokens, 0], 1 + np.arange(64))  # crop 1 + r*8 + c
  # Each cell crop is exactly that cell's pixels (normalised), not a resampled mix.
  lut = preprocess._normalize_lut(inputs.processor_spec(cfg))
  rgb = np.asarray(image.convert("RGB"))
  for (r, c), k in zip(cells, 1 + np.arange(64)):
    cell = rgb[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
    assert np.array_equal(sample.pixels[k], lut[cell, np.arange(3)])
  if view["answer_cell"] is not None:
    r, c = view["answer_cell"]
    assert sample.vis_src[view["answer_token"], 0] == 1 + r * 8 + c


def test_source_and_harness_read_pages(tmp_path):
  from visor_jax.evaluation import harness
  from visor_jax.training import config as train_config
  c = train_config.default("pages")
  assert "pages" in sources.SOURCES and c.data.pages_grid == 8
  c.data.source, c.data.synthetic_dir = "pages", str(tmp_path)
  c.data.synthetic_sizes = dict(train=4, validation=2, test=0)
  recs = sources.source_for(c.data, "validation", "/unused")
  assert len(recs) == 2 and recs[0] == pages.generate_example(0, "validation", 0)[0]
  assert (tmp_path / "visor_pages_vqa").is_dir()
  items = harness.synthetic_items(str(tmp_path), "validation", dataset="pages", seed=0,
                              sizes=dict(c.data.synthetic_sizes))
  assert [it.dataset for it in items] == ["pages", "pages"]
  assert items[0].answers == (recs[0]["answer"],) and items[0].tags[0] == recs[0]["family"]
  assert sources.pages_params(ml_collections.ConfigDict(dict(
      synthetic_seed=1, synthetic_sizes=dict(train=1, validation=1, test=1)))) == dict(
          seed=1, sizes=dict(train=1, validation=1, test=1), grid=8, read_turn=False,
          turns=1, readout=False, families=pages.FAMILIES, white_digits=0)


def test_question_format_turns_training_only_turns_off():
  from visor_jax.training import config as train_config
  c = train_config.pages(grid=6, turns=6, read_turn=True)
  q = sources.question_format(c.data)
  assert (q.pages_turns, q.pages_read_turn) == (1, False)
  assert (c.data.pages_turns, c.data.pages_read_turn) == (6, True)  # a copy
  assert sources.pages_params(q) == {**sources.pages_params(c.data), "turns": 1,
                                     "read_turn": False}


def test_readout_variant_is_one_coloured_digit_read_back_from_pixels(tmp_path):
  """`readout=True`: 1 x 1 pages (one cell token), each one coloured digit on a page colour,
  asked "What is the <colour> digit?"; every digit equally often; its own build name."""
  sizes = dict(train=20, validation=10, test=0)
  pages_build.build(tmp_path, sizes=sizes, grid=6, readout=True)
  recs = pages_build.records("train", tmp_path, sizes=sizes, grid=6, readout=True)
  digits = []
  for rec in recs:
    img = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
    assert img.shape == (pages.CELL, pages.CELL, 3)
    human, gpt = rec["conversations"]
    question = human["value"]
    colour = question.removeprefix("<image>\nWhat is the ").removesuffix(" digit?")
    ink = np.all(img == pages.COLOURS[colour], -1)
    digit, = [d for d, g in pages.GLYPHS.items() if np.array_equal(ink, g)]
    assert gpt["value"] == digit and rec["family"] == "fine"
    digits.append(digit)
  assert sorted(digits) == sorted(str(i % 10) for i in range(20))
  assert pages_build.make_config(grid=6, readout=True).name != pages_build.make_config(grid=6).name


def test_families_build_is_the_full_splits_records_of_those_families(tmp_path):
  """`families=('fine',)` (the reproduction's lookup stage): exactly the full split's fine
  records, in order, ids and all; a name of its own; unknown family names are refused."""
  sizes = dict(train=25, validation=0, test=0)
  pages_build.build(tmp_path, sizes=sizes, grid=6, families=("fine",))
  recs = pages_build.records("train", tmp_path, sizes=sizes, grid=6, families=("fine",))
  full = [pages.generate_example(0, "train", i, 6)[0] for i in range(120)]
  assert [r["id"] for r in recs] == [r["id"] for r in full if r["family"] == "fine"][:25]
  assert all(r["family"] == "fine" for r in recs) and recs[3] == next(
      r for r in full if r["id"] == recs[3]["id"])
  two = [pages.family_index(0, "train", i, ("coarse", "interaction")) for i in range(40)]
  assert two == [i for i in range(80) if full[i]["family"] in ("coarse", "interaction")][:40]
  assert "fine" in pages_build.make_config(grid=6, families=("fine",)).name
  assert pages_build.make_config(grid=6).name == pages_build.make_config(
      grid=6, families=pages.FAMILIES).name
  with pytest.raises(ValueError, match="families"):
    pages_build.make_config(grid=6, families=("fin",))
