"""Synthetic fine-grained VQA, rendered with PIL and stored as a TFDS array_record dataset.

WHY: VISOR keeps every high-resolution visual token so that fine detail survives, and routes
per sample so that easy questions spend few self-attention layers. A CPU demo can only show
both with data whose questions split cleanly into *easy* (global: dominant colour, presence,
counting large shapes) and *hard* (fine detail: a small 4-digit code, the colour of a small
shape next to another), with ground truth exact by construction.

Storage is tensorflow-datasets array_record (random access, no TensorFlow): images are PNG
bytes in a scalar object `Tensor` (`tfds.features.Image` would need TF to decode), the
conversation is a JSON `Text`. Every example is a pure function of (seed, split, index), and
examples are serialized canonically, so two builds give byte-identical files.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.proto import tf_example_pb2

SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}
COLOURS = {  # name -> RGB; shapes are drawn without anti-aliasing, so pixels are exact.
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 210),
    "yellow": (240, 210, 40), "orange": (245, 130, 20), "purple": (130, 50, 170),
    "pink": (245, 140, 190), "brown": (120, 70, 30), "gray": (128, 128, 128),
    "white": (250, 250, 250), "black": (15, 15, 15), "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
MAX_LARGE = 3
QUESTIONS = {
    "dominant_colour": "What is the dominant colour?",
    "has_shape": "Is there a {shape}?",
    "count_large": "How many large shapes are there?",
    "code": "What is the 4-digit code?",
    "small_next_to": "What colour is the small {shape} next to the {other}?",
}
FAMILY_KINDS = {"easy": ("dominant_colour", "has_shape", "count_large"),
                "hard": ("code", "small_next_to")}
# Geometry, as fractions of the image's short side.
LARGE_R, SMALL_R = (0.10, 0.18), (0.012, 0.025)  # half-extent of a shape's box
MARGIN = 0.02     # minimum gap between any two items, and to the image border
FAR = 0.10        # small distractors of the target's kind stay at least this far from the anchor
DOMINANT_MARGIN = 0.02  # dominant colour must lead the runner-up by this fraction of pixels
PNG_LEVEL = 1     # fixed zlib level: deterministic, and the flat images compress well anyway


# ----------------------------------------------------------------------------- scenes


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """One independent stream per example, so any record can be regenerated on its own."""
  return np.random.default_rng([seed, SPLITS.index(split), index])


def _font(size: int) -> ImageFont.ImageFont:
  """Pillow's built-in font (no download); scalable when Pillow has FreeType."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # old Pillow / no FreeType: fixed bitmap font
    return ImageFont.load_default()


def _gap(a, b) -> float:
  """Separation of two boxes (x0, y0, x1, y1); negative when they overlap."""
  return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _box(cx, cy, r):
  return (cx - r, cy - r, cx + r, cy + r)


def _place(rng, w, h, half_w, half_h, side, placed, extra_ok=lambda box: True):
  """Rejection-samples a free spot for a box; None if the scene is too crowded."""
  m = MARGIN * side
  if 2 * (half_w + m) >= w or 2 * (half_h + m) >= h:
    return None
  for _ in range(200):
    cx = float(rng.uniform(half_w + m, w - half_w - m))
    cy = float(rng.uniform(half_h + m, h - half_h - m))
    box = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    if all(_gap(box, p) >= m for p in placed) and extra_ok(box):
      return box
  return None


def _try_scene(rng, min_side, max_side):
  """One attempt at a scene spec (a JSON-able dict); None when placement fails.

  The anchor's kind appears exactly once ("the triangle" is definite); exactly one small
  shape of the target kind sits next to it, all other small ones of that kind are far away.
  """
  w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
  side = min(w, h)
  background = str(rng.choice(list(COLOURS)))
  palette = [c for c in COLOURS if c != background]
  kinds = [str(k) for k in rng.choice(SHAPES, size=int(rng.integers(2, 5)), replace=False)]
  anchor_kind, target_kind = kinds[0], kinds[1]
  n_large, n_small = int(rng.integers(0, MAX_LARGE + 1)), int(rng.integers(2, 7))

  def shape(kind, size, cx, cy, r):
    return {"kind": kind, "colour": str(rng.choice(palette)), "size": size,
            "cx": cx, "cy": cy, "r": r}

  anchor_large = n_large > 0 and rng.random() < 0.5
  ra = float(rng.uniform(*(LARGE_R if anchor_large else SMALL_R))) * side
  box = _place(rng, w, h, ra, ra, side, [])
  if box is None:
    return None
  anchor = shape(anchor_kind, "large" if anchor_large else "small",
                 (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, ra)
  # The target touches nothing: a gap of 0.5-1.5 of its size, on a random side of the anchor.
  rt = float(rng.uniform(*SMALL_R)) * side
  dist = ra + rt + float(rng.uniform(0.5, 1.5)) * 2 * rt
  dx, dy = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
  jitter = float(rng.uniform(-0.5, 0.5)) * ra  # sideways, still beside the anchor
  tx = anchor["cx"] + dx * dist + dy * jitter
  ty = anchor["cy"] + dy * dist + dx * jitter
  m = MARGIN * side
  if not (rt + m <= tx <= w - rt - m and rt + m <= ty <= h - rt - m):
    return None
  target = shape(target_kind, "small", tx, ty, rt)
  shapes = [anchor, target]
  placed = [_box(s["cx"], s["cy"], s["r"]) for s in shapes]

  code = "".join(str(d) for d in rng.integers(0, 10, size=4))
  font_size = max(9, round(side * float(rng.uniform(0.016, 0.022))))
  x0, y0, x1, y1 = _font(font_size).getbbox(code)
  text_box = _place(rng, w, h, (x1 - x0) / 2, (y1 - y0) / 2, side, placed)
  if text_box is None:
    return None
  placed.append(text_box)

  rest = (["large"] * (n_large - int(anchor_large))
          + ["small"] * (n_small - 1 - int(not anchor_large)))  # anchor & target count too
  for size in rest:
    kind = str(rng.choice(kinds[1:]))
    r = float(rng.uniform(*(LARGE_R if size == "large" else SMALL_R))) * side
    distractor = kind == target_kind and size == "small"
    box = _place(rng, w, h, r, r, side, placed,
                 lambda b: not distractor or _gap(b, placed[0]) >= FAR * side)
    if box is None:
      return None
    placed.append(box)
    shapes.append(shape(kind, size, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, r))
  dark = sum(COLOURS[background]) < 3 * 110
  return {"width": w, "height": h, "background": background, "shapes": shapes,
          "code": code, "font_size": font_size, "code_box": list(text_box),
          "text_colour": "white" if dark else "black", "anchor": 0, "target": 1}


def sample_scene(rng: np.random.Generator, min_side: int = 768, max_side: int = 1536) -> dict:
  """A scene spec: size, background, shapes (kind/colour/size/centre/half-extent), code."""
  for _ in range(1000):
    scene = _try_scene(rng, min_side, max_side)
    if scene is not None:
      return scene
  raise RuntimeError(f"could not place a scene in {min_side}-{max_side} px; use larger sides")


def _polygon(kind, cx, cy, r):
  if kind == "triangle":
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if kind == "diamond":
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
  if kind == "star":
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return [(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for q, a in zip(rad, ang)]
  raise ValueError(kind)


def render(scene: dict) -> Image.Image:
  """Draws the scene; shapes without anti-aliasing so every shape pixel is a palette colour."""
  image = Image.new("RGB", (scene["width"], scene["height"]), COLOURS[scene["background"]])
  draw = ImageDraw.Draw(image)
  for s in scene["shapes"]:
    fill, box = COLOURS[s["colour"]], _box(s["cx"], s["cy"], s["r"])
    if s["kind"] == "circle":
      draw.ellipse(box, fill=fill)
    elif s["kind"] == "square":
      draw.rectangle(box, fill=fill)
    else:
      draw.polygon(_polygon(s["kind"], s["cx"], s["cy"], s["r"]), fill=fill)
  font = _font(scene["font_size"])
  bx0, by0, _, _ = font.getbbox(scene["code"])
  x0, y0 = scene["code_box"][:2]
  draw.text((x0 - bx0, y0 - by0), scene["code"], fill=COLOURS[scene["text_colour"]], font=font)
  return image


def colour_counts(image: Image.Image) -> dict[str, int]:
  """Pixels per palette colour (anti-aliased text pixels match none and are ignored)."""
  by_rgb = {rgb: name for name, rgb in COLOURS.items()}
  counts = image.getcolors(image.width * image.height) or []
  return {by_rgb[rgb]: n for n, rgb in counts if rgb in by_rgb}


def dominant_colour(image: Image.Image) -> tuple[str, float]:
  """(colour with most pixels, its lead over the runner-up as a fraction of the image)."""
  ranked = sorted(colour_counts(image).items(), key=lambda kv: (-kv[1], kv[0])) + [("", 0)]
  return ranked[0][0], (ranked[0][1] - ranked[1][1]) / (image.width * image.height)


def _ask(kind, scene, image, rng):
  """(question, answer) of one kind, read off the scene spec / rendered pixels."""
  shapes = scene["shapes"]
  if kind == "dominant_colour":
    return QUESTIONS[kind], dominant_colour(image)[0]
  if kind == "has_shape":
    present = sorted({s["kind"] for s in shapes})
    absent = [k for k in SHAPES if k not in present]
    pick, ans = (present, "yes") if rng.random() < 0.5 else (absent, "no")
    return QUESTIONS[kind].format(shape=str(rng.choice(pick))), ans
  if kind == "count_large":
    return QUESTIONS[kind], str(sum(s["size"] == "large" for s in shapes))
  if kind == "code":
    return QUESTIONS[kind], scene["code"]
  target, anchor = shapes[scene["target"]], shapes[scene["anchor"]]
  return QUESTIONS[kind].format(shape=target["kind"], other=anchor["kind"]), target["colour"]


def make_example(rng: np.random.Generator, min_side: int = 768, max_side: int = 1536):
  """Pure: rng -> (record in LLaVA conversation format, scene spec). The build's only source."""
  scene = sample_scene(rng, min_side, max_side)
  image = render(scene)
  family = "easy" if rng.random() < 0.5 else "hard"
  kinds = list(FAMILY_KINDS[family])
  if family == "easy" and dominant_colour(image)[1] < DOMINANT_MARGIN:
    kinds.remove("dominant_colour")  # near tie: not a fair question
  kind = str(rng.choice(kinds))
  question, answer = _ask(kind, scene, image, rng)
  buf = io.BytesIO()
  image.save(buf, format="PNG", compress_level=PNG_LEVEL)  # no pnginfo: no timestamps
  record = {"id": "", "image": buf.getvalue(),
            "conversations": [{"from": "human", "value": "<image>\n" + question},
                              {"from": "gpt", "value": answer}],
            "family": family, "kind": kind, "answer": answer}
  return record, scene


def generate_example(seed: int, split: str, index: int, min_side: int = 768,
                     max_side: int = 1536):
  """The (record, scene) stored at `split[index]` of a build with `seed`."""
  record, scene = make_example(example_rng(seed, split, index), min_side, max_side)
  record["id"] = f"{split}-{index:06d}"
  return record, scene


def corpus() -> list[str]:
  """Every question and answer string the generator can emit (tiny-tokenizer training)."""
  out = [QUESTIONS["dominant_colour"], QUESTIONS["count_large"], QUESTIONS["code"]]
  out += [QUESTIONS["has_shape"].format(shape=k) for k in SHAPES]
  out += [QUESTIONS["small_next_to"].format(shape=a, other=b)
          for a in SHAPES for b in SHAPES if a != b]
  return out + list(COLOURS) + ["yes", "no"] + [str(i) for i in range(10)] + ["<image>"]


# ----------------------------------------------------------------------------- tfds


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Generation parameters; the config name encodes them, so builds never collide."""
  seed: int = 0
  sizes: tuple = ()  # ((split, n), ...)
  min_side: int = 768
  max_side: int = 1536


def make_config(seed=0, sizes=None, min_side=768, max_side=1536) -> SyntheticConfig:
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  if set(sizes) != set(SPLITS) or min(sizes.values()) < 0:
    raise ValueError(f"sizes must give counts >= 0 for splits {SPLITS}, got {sizes}")
  if not 16 <= min_side <= max_side:
    raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
  name = f"seed{seed}-" + "-".join(f"{s}{sizes[s]}" for s in SPLITS) + f"-px{min_side}-{max_side}"
  return SyntheticConfig(name=name, seed=int(seed), sizes=tuple((s, int(sizes[s])) for s in SPLITS),
                         min_side=int(min_side), max_side=int(max_side))


class _CanonicalWriter(tfds_writer.ExampleWriter):
  """Re-serializes each tf.Example deterministically before it is written.

  WHY: protobuf (upb) serializes the Example's feature map in a per-process hash order, so
  without this two identical builds give different array_record bytes.
  """

  def write(self, path, examples):
    canonical = ((k, tf_example_pb2.Example.FromString(ex).SerializeToString(deterministic=True))
                 for k, ex in examples)
    return super().write(path, canonical)


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The storage shared by the embedded datasets: records {id, image (PNG bytes),
  conversations, family, kind, answer}, canonically serialised, in index order. A subclass
  sets VERSION and `_record(split, index)`."""

  def _record(self, split: str, index: int) -> dict:
    raise NotImplementedError

  def _info(self):
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True,  # order = index
        features=tfds.features.FeaturesDict({
            "id": text, "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "conversations": text, "family": text, "kind": text, "answer": text}))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s, n in self.builder_config.sizes if n > 0}

  def _generate_examples(self, split):
    for i in range(dict(self.builder_config.sizes)[split]):
      record = self._record(split, i)
      yield i, {**record, "conversations": json.dumps(record["conversations"])}

  def _example_writer(self):
    return _CanonicalWriter(file_format=self.info.file_format)


class VisorSyntheticVqa(RecordsBuilder, skip_registration=True):
  """Synthetic easy/hard VQA over high-resolution rendered scenes."""
  VERSION = tfds.core.Version("1.0.0")  # bump whenever generated content changes

  def _record(self, split, index):
    c = self.builder_config
    return generate_example(c.seed, split, index, c.min_side, c.max_side)[0]


def _builder(data_dir, **params) -> VisorSyntheticVqa:
  return VisorSyntheticVqa(data_dir=os.fspath(data_dir), config=make_config(**params),
                           file_format="array_record")


def build(data_dir, *, seed=0, sizes=None, min_side=768, max_side=1536) -> str:
  """Builds the dataset under `data_dir` unless present (idempotent); returns `data_dir`."""
  builder = _builder(data_dir, seed=seed, sizes=sizes, min_side=min_side, max_side=max_side)
  if not builder.is_prepared():  # nothing to download; never ask GCS for a prebuilt copy
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.fspath(data_dir)


def _decode(raw: dict) -> dict:
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return {"id": text(raw["id"]), "image": bytes(raw["image"]),
          "conversations": json.loads(text(raw["conversations"])),
          "family": text(raw["family"]), "kind": text(raw["kind"]), "answer": text(raw["answer"])}


class Records(collections.abc.Sequence):
  """Random-access view of one split as plain dicts in LLaVA conversation format."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index) + (len(self) if index < 0 else 0)
    if not 0 <= index < len(self):
      raise IndexError(index)
    return _decode(self._source[index])


def records(split, data_dir, *, seed=0, sizes=None, min_side=768, max_side=1536) -> Records:
  """The built `split` (same parameters as `build`); raises if it was never built."""
  builder = _builder(data_dir, seed=seed, sizes=sizes, min_side=min_side, max_side=max_side)
  if not builder.is_prepared():
    raise FileNotFoundError(f"{builder.data_dir} is not built; call synthetic.build() first")
  return Records(builder.as_data_source(split=split))


def print_examples(records_fn, data_dir, params: dict, per_split: int):
  """Each non-empty split's size and its first questions (a built dataset's command output);
  `records_fn` is a dataset module's `records`."""
  for s in SPLITS:
    if params["sizes"][s]:
      recs = records_fn(s, data_dir, **params)
      print(f"{s}: {len(recs)} examples")
      for r in recs[:per_split]:
        q = r["conversations"][0]["value"].replace("\n", " ")
        print(f"  [{r['family']}/{r['kind']}] {q} -> {r['answer']}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", required=True)
  p.add_argument("--seed", type=int, default=0)
  for s in SPLITS:
    p.add_argument(f"--{s}", type=int, default=DEFAULT_SIZES[s])
  p.add_argument("--min_side", type=int, default=768)
  p.add_argument("--max_side", type=int, default=1536)
  a = p.parse_args(argv)
  params = dict(seed=a.seed, sizes={s: getattr(a, s) for s in SPLITS},
                min_side=a.min_side, max_side=a.max_side)
  build(a.data_dir, **params)
  print_examples(records, a.data_dir, params, per_split=3)


if __name__ == "__main__":
  main()
