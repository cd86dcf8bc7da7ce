"""LLaVA-format conversation records → ChatML token ids, image streams and next-token targets.

Input: LLaVA-OneVision's released data format, one dict per sample::

  {"id": ..., "image": "rel/path.jpg" | bytes | [..] | None,
   "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}

Roles may be spelled human/user, gpt/assistant, system (`from`/`value` or `role`/`content`).

Prompt text (Qwen2 ChatML, as LLaVA-NeXT's `conv_qwen` / `preprocess_qwen` and transformers'
llava-onevision chat template both render it)::

  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
  <|im_start|>user\\n<image>\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n

A lone `<image>` not at the start of its turn is moved there (`<image>\\n` + text), as
LLaVA-NeXT's `preprocess_multimodal` does and as HF's template (images first) renders it.

Label mask (what is supervised): the assistant's answer tokens, its closing `<|im_end|>` and the
`\\n` after it. That is the assistant part of LLaVA-NeXT's `preprocess_qwen`, minus two things we
deliberately drop: (1) the `<|im_start|>assistant\\n` header, which the prompt always provides at
inference, and (2) its global un-masking of every `\\n`/`<|im_start|>`/`<|im_end|>` token, even in
system and user turns (that trains the model to predict the prompt's template). Nothing in a
system or user turn is supervised.

Reading: `JsonSource` gives random access to a LLaVA `.json` / `.jsonl` file; a line that is not
JSON becomes a `BadRecord`, which `encode_record` reports as `malformed`.

numpy + PIL + tokenizers only: this runs in data-loader workers (no jax).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image

from visor_jax import paths
from visor_jax.config_lib import ModelConfig
from visor_jax.data import inputs, preprocess
from visor_jax.data.tokenizer import IM_END, IM_START, IMAGE_TOKEN, Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IGNORE = -1  # target value of unsupervised positions

# Why a sample can be skipped. The order is the layout of the pipeline's `bad_counts` vector;
# new reasons go last, so a data-iterator checkpoint's shorter counts still line up.
BAD_REASONS = ("missing_image", "corrupt_image", "malformed", "no_assistant_turn", "too_long",
               "unsafe_path")

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


class BadSample(Exception):
  """A record that cannot become a training example; the pipeline skips and counts it."""

  def __init__(self, reason: str, message: str):
    if reason not in BAD_REASONS:
      raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {BAD_REASONS}.")
    super().__init__(reason, message)
    self.reason, self.message = reason, message

  def __str__(self) -> str:
    return f"{self.reason}: {self.message}"


@dataclasses.dataclass
class Example:
  """One encoded record: the model inputs plus the text stream's next-token targets."""
  sample: inputs.Sample
  targets: np.ndarray         # int32[T]: next token of text token i, or IGNORE
  id: str
  family: str | None = None   # e.g. 'easy' / 'hard' (per-family evaluation)
  kind: str | None = None
  truncated: bool = False     # text was cut at max_text_len

  @property
  def num_supervised(self) -> int:
    return int(np.sum(self.targets != IGNORE))


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """Stands in for a record the source could not even parse (e.g. a broken JSONL line)."""
  reason: str
  message: str


class JsonSource:
  """Random access to a LLaVA `.json` (a list) or `.jsonl` file.

  JSONL lines are indexed by byte offset and read with `os.pread` (thread-safe, no file
  position). A `.json` list is parsed in every process that reads it rather than pickled into
  each worker. Unparseable lines come back as `BadRecord` (counted as `malformed`).
  """

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None):
    self.path = os.fspath(path)
    self.image_root = os.fspath(image_root) if image_root else paths.dirname(self.path)
    self._lock = threading.Lock()
    self._fd = self._file = self._records = None
    if self.path.endswith(".jsonl"):
      self._spans = self._index_lines()                   # int64[N, 2]: (offset, length)
    elif self.path.endswith(".json"):
      self._spans = None
      self._len = len(self._load_json())
    else:
      raise ValueError(f"{self.path}: expected a .json or .jsonl file.")

  def _index_lines(self) -> np.ndarray:
    spans, offset = [], 0
    with paths.open(self.path, "rb") as f:
      for line in f:
        if line.strip():
          spans.append((offset, len(line)))
        offset += len(line)
    return np.asarray(spans, np.int64).reshape(-1, 2)

  def _load_json(self) -> list:
    with self._lock:
      if self._records is None:
        with paths.open(self.path, encoding="utf-8") as f:
          data = json.load(f)
        if not isinstance(data, list):
          raise ValueError(f"{self.path}: expected a JSON list of records.")
        self._records = data
    return self._records

  def __len__(self) -> int:
    return len(self._spans) if self._spans is not None else self._len

  def __getitem__(self, index: int) -> Any:
    if self._spans is None:
      return self._load_json()[index]
    offset, length = (int(x) for x in self._spans[index])
    try:
      return json.loads(self._read_span(offset, length))
    except ValueError as e:
      return BadRecord("malformed", f"{self.path}: line at byte {offset} is not JSON ({e})")

  def _read_span(self, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`: `os.pread` on a local file; a seek and a ranged read on a
    remote one (one open handle per process, under the lock)."""
    if not paths.is_remote(self.path):
      if self._fd is None:
        with self._lock:
          self._fd = self._fd if self._fd is not None else os.open(self.path, os.O_RDONLY)
      return os.pread(self._fd, length, offset)
    with self._lock:
      if self._file is None:
        self._file = paths.open(self.path, "rb")
      self._file.seek(offset)
      return self._file.read(length)

  def __getstate__(self):
    state = dict(self.__dict__, _fd=None, _file=None, _lock=None)
    if self._spans is None:
      state["_records"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())


# ----------------------------------------------------------------------------- images


class ImageLoader:
  """Turns a record's image reference into a decoded PIL image, or raises `BadSample`.

  References: encoded bytes, a path, a HF-datasets style dict `{"bytes": ..., "path": ...}`,
  or an already decoded PIL image / uint8 array. Decoding is forced here (`load()`), so
  truncated files fail now, as `corrupt_image`.

  Paths come from untrusted records, so with an `image_root` they are confined to it: an
  absolute path, or one whose real path (`..`, symlinks resolved) leaves the root, is
  `unsafe_path`, refused before anything is opened. `JsonSource` always supplies a root
  (`data.image_root`, else the JSON file's directory), and so does the evaluation harness for
  question files (`--image_root`, else the question file's directory). Without one
  (`ImageLoader()`) a path is used as given: that is for trusted callers only (a command-line
  `--image`, items a program builds itself).
  """

  def __init__(self, image_root: str | os.PathLike | None = None):
    self.image_root = None if image_root is None else os.fspath(image_root)
    # The root's own real path: a root that is itself a symlink (/data -> /mnt/data) is fine.
    # A remote root (gs://) has no links: its normalised URL (`paths.confine` checks those).
    self._real_root = None if image_root is None else (
        paths.normalize(self.image_root) if paths.is_remote(self.image_root)
        else os.path.realpath(self.image_root))

  def resolve(self, path: str) -> str:
    """The real path to open; raises `BadSample('unsafe_path')` if it is outside the root."""
    if self._real_root is None:
      return path
    if paths.is_remote(self._real_root):
      try:
        return paths.confine(self._real_root, path)
      except paths.Unconfined as e:
        raise BadSample("unsafe_path", f"image path {path!r}: {e}") from None
    if os.path.isabs(path):
      raise BadSample("unsafe_path", f"absolute image path {path!r} (paths must be relative "
                      f"to the image root {self.image_root})")
    try:
      real = os.path.realpath(os.path.join(self._real_root, path))
    except ValueError as e:  # e.g. an embedded NUL byte
      raise BadSample("unsafe_path", f"image path {path!r} is not a valid path ({e})") from None
    if os.path.commonpath([real, self._real_root]) != self._real_root:
      raise BadSample("unsafe_path", f"image path {path!r} leads outside the image root "
                      f"{self.image_root}")
    return real

  def __call__(self, ref: Any) -> PIL.Image.Image | np.ndarray:
    if isinstance(ref, (PIL.Image.Image, np.ndarray)):
      return ref
    if isinstance(ref, dict):
      ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
      return _decode(io.BytesIO(bytes(ref)), "<bytes>")
    if isinstance(ref, (str, os.PathLike)):
      path = self.resolve(os.fspath(ref))
      if not paths.isfile(path):
        raise BadSample("missing_image", f"image file not found: {path}")
      return _decode(io.BytesIO(paths.read_bytes(path)), path)
    raise BadSample("malformed", f"unsupported image reference of type {type(ref).__name__}")


def _decode(stream: io.BytesIO, name: str) -> PIL.Image.Image:
  try:
    image = PIL.Image.open(stream)
    image.load()
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
    raise BadSample("corrupt_image", f"cannot decode image {name}: {e}") from None
  return image


def image_refs(record: dict) -> list:
  """The record's images as a list (LLaVA-OV uses `image`: str | list; also `images`)."""
  refs = record.get("image", record.get("images"))
  if refs is None:
    return []
  return list(refs) if isinstance(refs, (list, tuple)) else [refs]


# ----------------------------------------------------------------------------- text


def parse_turns(record: Any) -> list[tuple[str, str]]:
  """[(role, text)] with canonical roles, validated; raises `BadSample('malformed' | ...)`."""
  if isinstance(record, BadRecord):
    raise BadSample(record.reason, record.message)
  if not isinstance(record, dict):
    raise BadSample("malformed", f"record is a {type(record).__name__}, not a dict")
  if "video" in record:
    raise BadSample("malformed", "video records are not supported")
  convs = record.get("conversations", record.get("messages"))
  if not isinstance(convs, list) or not convs:
    raise BadSample("malformed", "missing or empty 'conversations' list")
  turns = []
  for i, turn in enumerate(convs):
    if not isinstance(turn, dict):
      raise BadSample("malformed", f"turn {i} is not a dict")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role not in ROLES:
      raise BadSample("malformed", f"turn {i}: unknown role {role!r}")
    if not isinstance(text, str):
      raise BadSample("malformed", f"turn {i}: text is a {type(text).__name__}, not a str")
    if ROLES[role] == "system" and i != 0:
      raise BadSample("malformed", f"turn {i}: a system turn is only allowed first")
    if IM_START in text or IM_END in text:  # would forge turn boundaries (and labels)
      raise BadSample("malformed", f"turn {i}: text contains ChatML control tokens")
    turns.append((ROLES[role], _image_first(text)))
  if not any(role == "assistant" for role, _ in turns):
    raise BadSample("no_assistant_turn", "no gpt/assistant turn to learn from")
  return turns


def _image_first(text: str) -> str:
  """LLaVA-NeXT's normalisation: a single `<image>` not leading its turn moves to the front."""
  if text.count(IMAGE_TOKEN) == 1 and not text.startswith(IMAGE_TOKEN):
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
  return text


def render_chatml(turns: Sequence[tuple[str, str]], system_prompt: str | None
                  ) -> tuple[str, list[tuple[int, int]]]:
  """The ChatML prompt and the character spans [start, end) that are supervised.

  A leading system turn in the record replaces `system_prompt`; a falsy `system_prompt` means no
  system turn at all (HF's template without a system message).
  """
  if turns and turns[0][0] != "system" and system_prompt:
    turns = [("system", system_prompt), *turns]
  pieces, spans, pos = [], [], 0
  for role, text in turns:
    header, body = f"{IM_START}{role}\n", f"{text}{IM_END}\n"
    pieces += [header, body]
    pos += len(header)
    if role == "assistant":
      spans.append((pos, pos + len(body)))
    pos += len(body)
  return "".join(pieces), spans


def tokenize_with_mask(tokenizer: Tokenizer, text: str, spans: Sequence[tuple[int, int]]
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int64[L], supervised bool[L]) tokenising the whole prompt at once.

  One call on the full string gives exactly the ids HF's processor produces (BPE merges at turn
  boundaries included); the mask comes from each token's character offset.
  """
  enc = tokenizer.tok.encode(text, add_special_tokens=False)
  ids = np.asarray(enc.ids, np.int64)
  starts = np.asarray([s for s, _ in enc.offsets], np.int64)
  supervised = np.zeros(len(ids), bool)
  for a, b in spans:
    supervised |= (starts >= a) & (starts < b)
  return ids, supervised


def truncate(ids: np.ndarray, supervised: np.ndarray, image_token_id: int, max_text_len: int
             ) -> tuple[np.ndarray, np.ndarray, int]:
  """Keeps the first `max_text_len` text tokens (placeholders don't count; the ones past the cut
  are dropped with their images). Returns (ids, supervised, number of images kept)."""
  is_text = ids != image_token_id
  if is_text.sum() > max_text_len:
    cut = int(np.flatnonzero(is_text)[max_text_len - 1]) + 1
    ids, supervised = ids[:cut], supervised[:cut]
  return ids, supervised, int(np.sum(ids == image_token_id))


def next_token_targets(tokens: np.ndarray, text_pos: np.ndarray, supervised: np.ndarray
                       ) -> np.ndarray:
  """int32[T]: target[i] = tokens[i+1] if text token i+1 directly follows token i in the
  interleaved sequence (no visual token between them) and is supervised, else IGNORE."""
  targets = np.full(len(tokens), IGNORE, np.int32)
  if len(tokens) > 1:
    follows = text_pos[1:] == text_pos[:-1] + 1
    take = follows & supervised[1:]
    targets[:-1] = np.where(take, tokens[1:], IGNORE)
  return targets


# ----------------------------------------------------------------------------- record


def encode_record(record: Any, tokenizer: Tokenizer, cfg: ModelConfig,
                  image_loader: Callable[[Any], Any] | None = None, *, max_text_len: int,
                  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                  max_visual: int | None = None, max_crops: int | None = None,
                  spec: preprocess.ImageProcessorSpec | None = None,
                  overlong: str = "truncate") -> Example:
  """One LLaVA record → `Example`; raises `BadSample` for anything that should be skipped.

  Text past `max_text_len`: `overlong='truncate'` keeps the first tokens (the example says
  `truncated`; a sample left with no supervised token is `too_long`); 'skip' makes any
  over-long sample `too_long`.

  Cheap checks (structure, placeholders, length) run before any image is decoded, so a bad
  record costs little. `max_visual` / `max_crops` reject samples whose images would not fit the
  pipeline's static shapes (`too_long`).
  """
  if tokenizer.image_token_id != cfg.image_token_id:
    raise ValueError(f"tokenizer's {IMAGE_TOKEN} id {tokenizer.image_token_id} differs from "
                     f"model.image_token_id={cfg.image_token_id}.")
  if max_text_len < 2:
    raise ValueError(f"max_text_len={max_text_len} must be >= 2.")
  image_loader = image_loader or ImageLoader()
  turns = parse_turns(record)
  refs = image_refs(record)
  text, spans = render_chatml(turns, system_prompt)
  ids, supervised = tokenize_with_mask(tokenizer, text, spans)
  n_placeholders = int(np.sum(ids == cfg.image_token_id))
  if n_placeholders != len(refs):
    raise BadSample("malformed", f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) but "
                    f"{len(refs)} image(s)")
  n_text = int(np.sum(ids != cfg.image_token_id))
  if overlong == "skip" and n_text > max_text_len:
    raise BadSample("too_long", f"{n_text} text tokens > max_text_len={max_text_len} "
                    "(data.overlong='skip')")
  ids, supervised, n_images = truncate(ids, supervised, cfg.image_token_id, max_text_len)
  if not _any_supervised_target(ids, supervised, cfg.image_token_id):
    raise BadSample("too_long", f"{n_text} text tokens: no supervised token survives "
                    f"truncation to {max_text_len}")
  images = [image_loader(ref) for ref in refs[:n_images]]
  try:
    sample = inputs.build_sample(ids, images, cfg, spec)
  except ValueError as e:  # preprocess rejects the decoded image (zero size, odd mode, ...)
    raise BadSample("corrupt_image", f"unusable image: {e}") from None
  _check_visual_limits(sample, max_visual, max_crops)
  text_supervised = supervised[ids != cfg.image_token_id]
  targets = next_token_targets(sample.tokens, sample.text_pos, text_supervised)
  return Example(sample=sample, targets=targets, id=str(record.get("id", "")),
                 family=_opt_str(record.get("family")), kind=_opt_str(record.get("kind")),
                 truncated=n_text > max_text_len)


def _any_supervised_target(ids: np.ndarray, supervised: np.ndarray, image_token_id: int) -> bool:
  """The id-space twin of `next_token_targets`: does any text token get a target?"""
  is_text = ids != image_token_id
  return bool(np.any(is_text[:-1] & is_text[1:] & supervised[1:]))


def _check_visual_limits(sample: inputs.Sample, max_visual: int | None,
                         max_crops: int | None) -> None:
  if max_visual is not None and sample.num_visual_tokens > max_visual:
    raise BadSample("too_long", f"{sample.num_visual_tokens} visual tokens exceed "
                    f"max_visual={max_visual}")
  if max_crops is not None and len(sample.pixels) > max_crops:
    raise BadSample("too_long", f"{len(sample.pixels)} crops exceed max_crops={max_crops}")


def _opt_str(value: Any) -> str | None:
  return None if value is None else str(value)
