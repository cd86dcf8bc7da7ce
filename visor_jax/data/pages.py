"""Pages: synthetic VQA whose question families separate what VISOR's parts can do.

WHY: the `synthetic` scenes put their fine detail far below one visual token, so no model of
CPU size can answer the hard questions and nothing about VISOR can be shown. Here a page is a
grid of 14 px cells and the `pages` model geometry (`model_configs.pages`) makes every cell
exactly one crop = one patch = one visual token, with no resampling. Each question family then
needs a known part of the model (see docs/pages_dataset.md):

  coarse       page colour / big blocks: readable from the 1-token low-resolution base view;
  fine         "what is the red digit": one cell's content, a cross-attention (CA) lookup;
  control      the digit right of a marker: 1 token after it, within the positional conv's
               reach (kernel 7: +-3 tokens), so CA alone can answer;
  interaction  the digit below a marker: grid + 1 tokens after it (AnyRes adds a newline per
               row), beyond 3 x #CA; needs visual-visual self-attention (SA).

Both relations point *forward* in the token sequence: the LLM's self-attention is causal, so
the answer cell's token can see the marker above or left of it and learn "the marker is my
neighbour", a key the text then finds by content and reads like a fine question. Asked the
other way ("above", "left"), the answer would have to be copied into the marker's token and
read out of it as a second quantity, which no model here learned (docs/pages_dataset.md).

Glyphs and markers are fixed bitmaps defined here (never a system font), painted without
anti-aliasing, so every pixel is exact on every machine and the answers can be read back from
the PNG. Storage is exactly `synthetic`'s: a tensorflow-datasets array_record build without
TensorFlow, PNG bytes, canonical serialization, every example a pure function of
(seed, split, index): `pages_build.py` builds and reads it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from visor_jax.data import synthetic
from visor_jax.data.synthetic import SPLITS

DEFAULT_SIZES = {"train": 8000, "validation": 800, "test": 1600}  # test: 400 per family
CELL = 14                  # px per cell = crop = patch: one visual token per cell
MIN_GRID, MAX_GRID = 4, 16
PNG_LEVEL = synthetic.PNG_LEVEL
# Dark page colours (the coarse answer) and bright ink colours (coloured digits, markers,
# blocks); plain digits are white. All distinct, so every pixel names its role exactly.
PAGE_COLOURS = {"black": (16, 16, 16), "navy": (16, 24, 88), "maroon": (88, 16, 24),
                "teal": (8, 72, 72)}
WHITE = (250, 250, 250)
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 70), "blue": (60, 110, 255),
           "yellow": (245, 220, 40), "orange": (250, 140, 20), "purple": (170, 80, 230),
           "pink": (250, 150, 200), "cyan": (60, 220, 230)}
SHAPES = ("circle", "square", "triangle", "diamond")
# One marker and one coloured digit per page. The questions still name them ("the red
# digit", "the blue circle"), but the lookup key is then a fixed feature (the one coloured
# digit, the one marker), not one the question picks among several: at CPU scale the models
# here learned fixed-key lookups in ~150 steps once they could read a digit, and never left
# the plateau of question-keyed ones (colour binding among 3-4 digits) in the steps there
# were (docs/pages_dataset.md, "The learnability gate"). What each family needs from VISOR
# (CA, the positional conv, SA) does not change.
MARKERS_PER_PAGE = 1
COLOURED_DIGITS_PER_PAGE = 1
FAMILIES = ("coarse", "fine", "control", "interaction")
FAMILY_KINDS = {"coarse": ("page_colour", "count_blocks", "has_block"),
                "fine": ("colour_digit",), "control": ("right",),
                "interaction": ("below",)}
QUESTIONS = {
    "page_colour": "What colour is the page?",
    "count_blocks": "How many big blocks are there?",
    "has_block": "Is there a big {colour} block?",
    "colour_digit": "What is the {colour} digit?",
    # The two differ only in the relation word, so any accuracy gap is about the relation.
    "right": "What digit is right of the {colour} {shape}?",
    "below": "What digit is below the {colour} {shape}?",
}
STEP = {"right": (0, 1), "below": (1, 0)}  # (d_row, d_col)
STRATUM = 40     # every aligned run of 40 examples holds each (family, answer slot) once
_STRATUM_TAG = 0x9A6E5  # salts the stratum stream apart from the per-example streams
PERM_TRIES = 64

# ----------------------------------------------------------------------------- bitmaps

# 5x6 digits, drawn at 2x (10x12 px) at rows 1-12, columns 2-11 of a cell.
_FONT = {
    "0": (".###.", "#...#", "#...#", "#...#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", ".###.", "....#", "....#", "####."),
    "4": ("#..#.", "#..#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "####."),
    "6": (".###.", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", "..#..", "..#.."),
    "8": (".###.", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", ".###."),
}


def _glyph(rows) -> np.ndarray:
  """bool[CELL, CELL]: a 5x6 glyph at 2x, centred (1 px top/bottom, 2 px left/right)."""
  small = np.array([[ch == "#" for ch in row] for row in rows])
  out = np.zeros((CELL, CELL), bool)
  out[1:13, 2:12] = np.kron(small, np.ones((2, 2), bool))
  return out


def _markers() -> dict[str, np.ndarray]:
  """bool[CELL, CELL] per marker shape, by exact integer/half-integer geometry."""
  y, x = np.mgrid[0:CELL, 0:CELL]
  cy = cx = (CELL - 1) / 2   # 6.5: the cell centre between pixels 6 and 7
  return {"circle": (x - cx) ** 2 + (y - cy) ** 2 <= 5.5 ** 2,
          "square": (x >= 2) & (x <= 11) & (y >= 2) & (y <= 11),
          "triangle": (y >= 1) & (y <= 12) & (np.abs(x - cx) <= y / 2),
          "diamond": np.abs(x - cx) + np.abs(y - cy) <= 6}


GLYPHS = {d: _glyph(rows) for d, rows in _FONT.items()}
MARKERS = _markers()
BLOCK = np.ones((CELL, CELL), bool)

# ----------------------------------------------------------------------------- layouts
# A layout is grid x grid cells, each a JSON-able [kind, value, colour]:
#   ["digit", "7", "white" | ink colour], ["marker", shape, ink colour], ["block", "", ink colour],
#   ["empty", "", ""] (only on the sparse curriculum pages, `sparse_layout`).


example_rng = synthetic.example_rng  # one stream per (seed, split, index)


def slot(seed: int, split: str, index: int) -> tuple[str, int]:
  """(family, answer slot 0-9) of `split[index]`.

  Stratified: each aligned run of STRATUM examples holds every (family, slot) pair once, in a
  seeded order, so families are exactly 25 % and digit answers exactly uniform per run of 40.
  """
  j = int(_stratum(seed, split, index // STRATUM)[index % STRATUM])
  return FAMILIES[j % len(FAMILIES)], j // len(FAMILIES)


def _stratum(seed: int, split: str, run: int) -> np.ndarray:
  """The seeded order of the (family, slot) pairs j in run `run` of STRATUM examples."""
  rng = np.random.default_rng([seed, SPLITS.index(split), run, _STRATUM_TAG])
  return rng.permutation(STRATUM)


def check_families(families) -> tuple[str, ...]:
  """`families` as a tuple of names; an error unless it is a non-empty subset of FAMILIES."""
  families = tuple(str(f) for f in families)
  if not families or any(f not in FAMILIES for f in families):
    raise ValueError(f"families={families}: expected a non-empty subset of {FAMILIES}")
  return families


def family_index(seed: int, split: str, index: int, families) -> int:
  """The index, in the full split, of the `index`-th record whose family is in `families`.

  A build restricted to some families (`pages_build`'s `families`: the reproduction's
  `lookup` stage trains on `fine` alone) holds exactly the full split's records of those
  families, in order, each with its own id: every run of STRATUM holds 10 of each family."""
  families = check_families(families)
  per_run = len(families) * (STRATUM // len(FAMILIES))
  run, k = divmod(index, per_run)
  order = _stratum(seed, split, run)
  picked = [i for i in range(STRATUM) if FAMILIES[order[i] % len(FAMILIES)] in families]
  return run * STRATUM + picked[k]


def max_blocks(grid: int) -> int:
  """0-3 big blocks fit with room to spare from 6x6; small curriculum pages get at most one."""
  return 3 if grid >= 6 else 1


def coarse_slots(grid: int) -> list[tuple[str, str]]:
  """(kind, answer) of coarse answer slots 0-9: every page colour, every block count, yes and
  no once each (4 + 4 + 2 at grid >= 6), so coarse answers are exactly balanced per kind."""
  out = [("page_colour", p) for p in PAGE_COLOURS]
  out += [("count_blocks", str(n)) for n in range(max_blocks(grid) + 1)]
  out += [("has_block", "yes"), ("has_block", "no")]
  return (out * 2)[:STRATUM // len(FAMILIES)]


def check_grid(grid: int):
  if not MIN_GRID <= grid <= MAX_GRID:
    raise ValueError(f"grid={grid} must be in [{MIN_GRID}, {MAX_GRID}]")


def _place_blocks(rng, grid, n, colours):
  """Top-left cells of `n` 2x2 blocks that neither overlap nor share an edge; None if stuck."""
  tops = []
  for _ in range(n):
    for _ in range(100):
      r, c = (int(v) for v in rng.integers(0, grid - 1, size=2))
      # Another block's 2x2 must not intersect this one's 4x4 halo minus its corners.
      if all(not (abs(r - r2) <= 2 and abs(c - c2) <= 2 and (abs(r - r2) < 2 or abs(c - c2) < 2))
             for r2, c2 in tops):
        tops.append((r, c))
        break
    else:
      return None
  return list(zip(tops, colours))


def _sample_page(rng, grid, n_blocks, page=None):
  """(page colour, layout) of a full page; None when placement fails (the caller retries)."""
  drawn = str(rng.choice(list(PAGE_COLOURS)))
  page = page or drawn  # drawn either way: the stream does not depend on the question
  layout = [[None] * grid for _ in range(grid)]
  block_colours = [str(c) for c in rng.choice(list(COLOURS), size=n_blocks, replace=False)]
  blocks = _place_blocks(rng, grid, n_blocks, block_colours)
  if blocks is None:
    return None
  for (r, c), colour in blocks:
    for dr in (0, 1):
      for dc in (0, 1):
        layout[r + dr][c + dc] = ["block", "", colour]
  free = [(r, c) for r in range(grid) for c in range(grid) if layout[r][c] is None]
  pairs = [(s, c) for s in SHAPES for c in COLOURS]
  n_markers = MARKERS_PER_PAGE
  cells = rng.choice(len(free), size=n_markers, replace=False)
  for k, i in zip(rng.choice(len(pairs), size=n_markers, replace=False), cells):
    r, c = free[i]
    layout[r][c] = ["marker", pairs[k][0], pairs[k][1]]  # distinct (shape, colour) pairs
  digit_cells = [(r, c) for r, c in free if layout[r][c] is None]
  for r, c in digit_cells:
    layout[r][c] = ["digit", str(int(rng.integers(10))), "white"]
  n_coloured = COLOURED_DIGITS_PER_PAGE
  for i, colour in zip(rng.choice(len(digit_cells), size=n_coloured, replace=False),
                       rng.choice(list(COLOURS), size=n_coloured, replace=False)):
    r, c = digit_cells[i]
    layout[r][c][2] = str(colour)
  return page, layout


def _find(layout, kind, value, colour):
  """Cells (row, col) holding [kind, value, colour] (value None: any)."""
  return [(r, c) for r, row in enumerate(layout) for c, cell in enumerate(row)
          if cell[0] == kind and cell[2] == colour and (value is None or cell[1] == value)]


def _white_digit(cell) -> bool:
  """Relation answers are plain white digits: one of ~50 interchangeable cells, so only the
  asked relation (not colour) singles the answer out."""
  return cell[0] == "digit" and cell[2] == "white"


def _neighbour(layout, cell, kind):
  """The cell one step in direction `kind` from `cell`, None if it is off the page."""
  r, c = cell[0] + STEP[kind][0], cell[1] + STEP[kind][1]
  return (r, c) if 0 <= r < len(layout) and 0 <= c < len(layout) else None


def answer_cell(layout, question):
  """(row, col) of the cell whose content is the answer (None for coarse questions); raises
  when the question is not well posed on this layout."""
  kind = question["kind"]
  if kind in FAMILY_KINDS["coarse"]:
    return None
  if kind == "colour_digit":
    found = _find(layout, "digit", None, question["colour"])
  else:
    anchors = _find(layout, "marker", question["shape"], question["colour"])
    if len(anchors) != 1:
      raise ValueError(f"{question}: {len(anchors)} matching markers")
    n = _neighbour(layout, anchors[0], kind)
    found = [n] if n is not None and _white_digit(layout[n[0]][n[1]]) else []
  if len(found) != 1:
    raise ValueError(f"{question}: not well posed on this layout")
  return found[0]


def answer(page, layout, question) -> str:
  """The answer to `question` on `layout`: the single source of labels for both variants."""
  kind = question["kind"]
  if kind == "page_colour":
    return page
  blocks = {cell[2] for row in layout for cell in row if cell[0] == "block"}
  if kind == "count_blocks":
    return str(sum(cell[0] == "block" for row in layout for cell in row) // 4)
  if kind == "has_block":
    return "yes" if question["colour"] in blocks else "no"
  r, c = answer_cell(layout, question)
  return layout[r][c][1]


def row_units(layout) -> list[list[int]]:
  """Rows in order, grouped so the two rows of every big block stay together."""
  units = [[0]]
  for r in range(1, len(layout)):
    joined = any(cell[0] == "block" and layout[r - 1][c] == cell
                 for c, cell in enumerate(layout[r]))  # block colours are unique per page
    if joined:
      units[-1].append(r)
    else:
      units.append([r])
  return units


def _blocks_apart(layout) -> bool:
  """No two blocks share an edge (rows keep their cells, so only vertical contact can arise)."""
  return not any(a[0] == b[0] == "block" and a[2] != b[2]
                 for upper, lower in zip(layout, layout[1:]) for a, b in zip(upper, lower))


def _permutation(rng, page, layout, question):
  """Rows for the permuted variant (shown row i = original row rows[i]), or None.

  Rows move in `row_units` so blocks survive, and no two blocks may come to touch (coarse
  labels are unchanged); each row keeps its cells, so fine and control labels are unchanged.
  For interaction questions the asked neighbour must again be a white digit and hold a
  *different* digit, so a model that ignores the new layout scores 0 on that family.
  """
  units = row_units(layout)
  if len(units) < 2:
    return None
  for _ in range(PERM_TRIES):
    rows = [r for i in rng.permutation(len(units)) for r in units[i]]
    if rows == sorted(rows) or not _blocks_apart([layout[r] for r in rows]):
      continue
    if question["family"] != "interaction":
      return rows
    try:
      moved = answer(page, [layout[r] for r in rows], question)
    except ValueError:
      continue
    if moved != answer(page, layout, question):
      return rows
  return None


def _try_example(rng, family, answer_slot, grid):
  """One attempt at a page + question honouring the slot; None when it does not work out."""
  top = max_blocks(grid)
  n_blocks, page = int(rng.integers(0, top + 1)), None
  question = {"family": family}
  if family == "coarse":
    kind, value = coarse_slots(grid)[answer_slot]
    question["kind"] = kind
    if kind == "page_colour":
      page = value
    elif kind == "count_blocks":
      n_blocks = int(value)
    elif value == "yes":
      n_blocks = int(rng.integers(1, top + 1))
  else:
    question["kind"] = kind = str(rng.choice(FAMILY_KINDS[family]))
  sampled = _sample_page(rng, grid, n_blocks, page)
  if sampled is None:
    return None
  page, layout = sampled
  if kind == "has_block":
    blocks = sorted({cell[2] for row in layout for cell in row if cell[0] == "block"})
    pool = blocks if value == "yes" else [c for c in COLOURS if c not in blocks]
    question["colour"] = str(rng.choice(pool))
  elif kind == "colour_digit":
    coloured = [cell[2] for row in layout for cell in row if cell[0] == "digit"
                and cell[2] != "white"]
    question["colour"] = str(rng.choice(coloured))
  elif family in ("control", "interaction"):
    anchors = [(r, c) for r, row in enumerate(layout) for c, cell in enumerate(row)
               if cell[0] == "marker"]
    ok = [a for a in anchors if (n := _neighbour(layout, a, kind)) is not None
          and _white_digit(layout[n[0]][n[1]])]
    if not ok:
      return None
    r, c = ok[int(rng.integers(len(ok)))]
    question["shape"], question["colour"] = layout[r][c][1], layout[r][c][2]
  if family != "coarse":  # the answer digit is the slot: digit answers exactly balanced
    r, c = answer_cell(layout, question)
    layout[r][c][1] = str(answer_slot)
  rows = _permutation(rng, page, layout, question)
  if rows is None:
    return None
  return {"grid": grid, "page": page, "layout": layout, "question": question, "rows": rows}


def generate_spec(seed: int, split: str, index: int, grid: int = 8) -> dict:
  """The unpermuted page of `split[index]` with its question and the row permutation that
  the permuted variant applies (computed in both modes, so the pages are the same)."""
  check_grid(grid)
  family, answer_slot = slot(seed, split, index)
  rng = example_rng(seed, split, index)
  for _ in range(1000):
    spec = _try_example(rng, family, answer_slot, grid)
    if spec is not None:
      return spec
  raise RuntimeError(f"could not build a {family} page at grid={grid}")


def sparse_layout(rng, layout, question, white_digits: int):
  """`layout` with only `white_digits` plain white digits left (the answer cell's among them
  when it is one); the others become empty cells. Markers, blocks and the coloured digit stay,
  so every question keeps its answer.

  WHY: the relation curriculum (`data.pages_white_digits`, the reproduction's `relations_k`
  stages). With one white digit, "the digit below the marker" is a fixed-key lookup like a
  fine question; with a few more the text must tell the asked cell from the others by what
  its token learned about its neighbour, and at full pages it must do so among ~30. Trained on
  full pages from the start, the relation families never left chance (docs/pages_dataset.md).
  """
  cell = answer_cell(layout, question)
  whites = [(r, c) for r, row in enumerate(layout) for c, x in enumerate(row)
            if _white_digit(x) and (r, c) != cell]
  keep = max(0, white_digits - (cell is not None and _white_digit(layout[cell[0]][cell[1]])))
  kept = {whites[i] for i in rng.permutation(len(whites))[:keep]}
  return [[x if not _white_digit(x) or (r, c) == cell or (r, c) in kept else ["empty", "", ""]
           for c, x in enumerate(row)] for r, row in enumerate(layout)]


def render(page: str, layout) -> np.ndarray:
  """uint8[grid*CELL, grid*CELL, 3]: each cell painted from its bitmap, no anti-aliasing."""
  grid = len(layout)
  img = np.empty((grid * CELL, grid * CELL, 3), np.uint8)
  img[:] = PAGE_COLOURS[page]
  for r, row in enumerate(layout):
    for c, (kind, value, colour) in enumerate(row):
      if kind == "empty":
        continue
      mask = {"digit": GLYPHS.get(value), "marker": MARKERS.get(value), "block": BLOCK}[kind]
      rgb = WHITE if colour == "white" else COLOURS[colour]
      img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL][mask] = rgb
  return img


def question_text(question: dict) -> str:
  return QUESTIONS[question["kind"]].format(**question)


def visual_token(grid: int, cell) -> int:
  """Index of a cell's token in the packed visual sequence: 1 base token, then each row's
  `grid` cells followed by one newline (the `pages` geometry's pure-gather AnyRes layout)."""
  return 1 + cell[0] * (grid + 1) + cell[1]


READ_QUESTION = "Read the page."
_TURNS_TAG = 0x7A25  # salts the extra-turn stream apart from the page's
_READOUT_TAG = 0x5EAD  # and the readout variant's
_SPARSE_TAG = 0x5BA5E  # and the sparse pages' choice of kept digits


def well_posed_questions(layout) -> dict[str, list[dict]]:
  """{family: every question with one answer on this layout} (has_block: the block colours,
  and as many absent colours)."""
  blocks = sorted({cell[2] for row in layout for cell in row if cell[0] == "block"})
  absent = [c for c in COLOURS if c not in blocks][:max(1, len(blocks))]
  out = {"coarse": [{"family": "coarse", "kind": "page_colour"},
                    {"family": "coarse", "kind": "count_blocks"}]
         + [{"family": "coarse", "kind": "has_block", "colour": c} for c in blocks + absent],
         "fine": [], "control": [], "interaction": []}
  for row in layout:
    for kind, value, colour in row:
      if kind == "digit" and colour != "white":
        out["fine"].append({"family": "fine", "kind": "colour_digit", "colour": colour})
      if kind == "marker":
        for family in ("control", "interaction"):
          for rel in FAMILY_KINDS[family]:
            q = {"family": family, "kind": rel, "shape": value, "colour": colour}
            try:
              answer_cell(layout, q)
            except ValueError:
              continue
            out[family].append(q)
  return out


def extra_turns(seed, split, index, page, layout, question, n) -> list[dict]:
  """`n` more questions on the same page, families in rotation (starting after the main
  question's), each family's question drawn from its well-posed ones, none repeated."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index, _TURNS_TAG])
  pool = well_posed_questions(layout)
  asked = [question]
  start = FAMILIES.index(question["family"])
  for i in range(1, 4 * n + 1):
    if len(asked) > n:
      break
    options = [q for q in pool[FAMILIES[(start + i) % len(FAMILIES)]] if q not in asked]
    if options:
      asked.append(options[int(rng.integers(len(options)))])
  out = []
  for q in asked[1:]:
    out += [{"from": "human", "value": question_text(q)},
            {"from": "gpt", "value": answer(page, layout, q)}]
  return out


def reading(layout) -> str:
  """The page read out cell by cell, one token each: its digit, or '-' for a marker, block or
  empty cell; rows end with a newline, as the visual rows do."""
  return "\n".join("".join(cell[1] if cell[0] == "digit" else "-" for cell in row)
                   for row in layout)


def make_example(spec: dict, permute_rows: bool = False, read_turn: bool = False,
                 extra: list | None = None):
  """Pure: spec -> (record, view). `view` is the rendered layout with its answer cell.

  `read_turn` puts a first turn before the question: "Read the page." answered by `reading`.
  It supervises every cell at once, in order, so the LLM learns to read visual tokens (a
  positional lookup at a fixed offset, easy under RoPE) before it can learn to find one by
  content: without it the models here never left chance on digit questions
  (docs/pages_dataset.md, "gate"). After the question it is not learnable in the same time
  (the offset then varies with the question's length).
  """
  layout = spec["layout"]
  if permute_rows:
    layout = [layout[r] for r in spec["rows"]]
  question = spec["question"]
  ans = answer(spec["page"], layout, question)  # re-derived from the layout shown
  cell = answer_cell(layout, question)
  buf = io.BytesIO()
  Image.fromarray(render(spec["page"], layout)).save(buf, format="PNG", compress_level=PNG_LEVEL)
  record = {"id": "", "image": buf.getvalue(),
            "conversations": [{"from": "human", "value": "<image>\n" + question_text(question)},
                              {"from": "gpt", "value": ans}],
            "family": question["family"], "kind": question["kind"], "answer": ans}
  if extra:
    record["conversations"] += extra
  if read_turn:
    qa = record["conversations"]
    record["conversations"] = [{"from": "human", "value": "<image>\n" + READ_QUESTION},
                               {"from": "gpt", "value": reading(layout)},
                               {"from": "human", "value": qa[0]["value"][len("<image>\n"):]},
                               *qa[1:]]
  view = {**spec, "layout": layout, "permuted": bool(permute_rows), "answer_cell": cell,
          "answer_token": None if cell is None else visual_token(spec["grid"], cell)}
  return record, view


def generate_example(seed: int, split: str, index: int, grid: int = 8, permute_rows: bool = False,
                     read_turn: bool = False, turns: int = 1, white_digits: int = 0):
  """The (record, view) stored at `split[index]`; the permuted variant keeps the same id.
  `read_turn` applies to every other train example (even indices): the others are asked as at
  evaluation, the question alone. `white_digits` > 0: the sparse curriculum page
  (`sparse_layout`) of the same spec."""
  spec = generate_spec(seed, split, index, grid)
  if white_digits:
    if permute_rows:
      raise ValueError("white_digits (sparse pages) and permute_rows do not combine")
    rng = np.random.default_rng([seed, SPLITS.index(split), index, _SPARSE_TAG])
    spec = {**spec, "layout": sparse_layout(rng, spec["layout"], spec["question"], white_digits)}
  extra = None
  if split == "train" and turns > 1:
    layout = [spec["layout"][r] for r in spec["rows"]] if permute_rows else spec["layout"]
    extra = extra_turns(seed, split, index, spec["page"], layout, spec["question"], turns - 1)
  record, view = make_example(spec, permute_rows,
                              read_turn and split == "train" and index % 2 == 0, extra)
  record["id"] = f"{split}-{index:06d}"
  return record, view


def readout_example(seed: int, split: str, index: int):
  """(record, view) of the readout variant: a 1 x 1 page, one coloured digit on a page colour,
  "What is the <colour> digit?". There is one cell token, always at the same place, so the LLM
  learns to *read* a digit from a visual token with no lookup to learn at the same time;
  `data.pages_readout` trains on it first (the reproduction's `readout` stage). Without that
  readout no model here found even one digit on an empty page (docs/pages_dataset.md)."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index, _READOUT_TAG])
  page = str(rng.choice(list(PAGE_COLOURS)))
  colour = str(rng.choice(list(COLOURS)))
  digit = str(index % 10)  # every digit equally often
  layout = [[["digit", digit, colour]]]
  question = {"family": "fine", "kind": "colour_digit", "colour": colour}
  record, view = make_example({"grid": 1, "page": page, "layout": layout, "question": question,
                               "rows": [0]})
  record["id"] = f"{split}-{index:06d}"
  return record, view


def corpus() -> list[str]:
  """Every question and answer string the generator can emit (tiny-tokenizer training).

  Answers are repeated so that the `pages` model's byte-level BPE learns each as one token
  (questions, being many, would otherwise take every merge).
  """
  out = [QUESTIONS["page_colour"], QUESTIONS["count_blocks"], READ_QUESTION]
  out += [QUESTIONS[k].format(colour=c) for k in ("has_block", "colour_digit") for c in COLOURS]
  out += [QUESTIONS[k].format(colour=c, shape=s) for k in STEP for c in COLOURS for s in SHAPES]
  # The retired relation wordings (version <= 1.1.0) stay in the corpus: without them the BPE
  # finds fewer merges than the `pages` model's 392 ids, and the tokenizer would change size.
  out += [f"What digit is {rel} the {c} {s}?" for rel in ("left of", "above") for c in COLOURS
          for s in SHAPES]
  answers = list(PAGE_COLOURS) + ["yes", "no"] + [str(i) for i in range(10)]
  # Every word, and the chat template's role names, repeated likewise: with the `pages`
  # model's 392 learned ids each becomes one token, so a question is ~10 tokens, not ~20.
  words = sorted({w for s in out for w in s.replace("?", " ").replace(".", " ").split()})
  template = "<|im_start|>user\n<|im_start|>assistant\n<|im_end|>\n"
  return out + answers * 256 + [" ".join(words)] * 64 + [template] * 64 + ["<image>"]
