"""Tokenizer from a transformers `tokenizer.json` (through `tokenizers`, no download), ChatML.

LLaVA-OV's Qwen2 tokenizer marks turns with `<|im_start|>role\\n ... <|im_end|>\\n`; the image
placeholder is the special token `<image>`. `build_tiny_tokenizer` makes a small byte-level
BPE with the same special tokens, for tests and the embedded synthetic default.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from visor_jax import paths

IMAGE_TOKEN = "<image>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (IMAGE_TOKEN, EOS, IM_START, IM_END)
# The files of a transformers tokenizer directory that travel with it (into checkpoints and
# exports): `tokenizer.json` is what we read; the rest is what transformers' processors read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json",
                   "chat_template.jinja")


class Tokenizer:
  def __init__(self, tok: tokenizers.Tokenizer, files: dict[str, str] | None = None):
    self.tok = tok
    # {file name: text}: the directory this tokenizer came from, written back by `save`.
    self.files = dict(files or {})
    self.files.setdefault("tokenizer.json", tok.to_str())
    missing = [t for t in (IMAGE_TOKEN, IM_START, IM_END) if tok.token_to_id(t) is None]
    if missing:
      raise ValueError(f"tokenizer has no {missing} token(s): not a LLaVA-OV tokenizer.")
    self.image_token_id = tok.token_to_id(IMAGE_TOKEN)
    self.im_start_id = tok.token_to_id(IM_START)
    self.im_end_id = tok.token_to_id(IM_END)
    self.eos_id = tok.token_to_id(EOS)

  @classmethod
  def from_dir(cls, directory: str) -> "Tokenizer":
    path = paths.join(directory, "tokenizer.json")
    if not paths.exists(path):
      raise FileNotFoundError(f"{directory}: no tokenizer.json.")
    files = {}
    for name in TOKENIZER_FILES:
      if paths.isfile(paths.join(directory, name)):
        files[name] = paths.read_text(paths.join(directory, name))
    return cls.from_files(files)

  @classmethod
  def from_files(cls, files: dict[str, str]) -> "Tokenizer":
    """{file name: text} (what `files` holds, e.g. read back from a checkpoint)."""
    if "tokenizer.json" not in files:
      raise ValueError(f"tokenizer files {sorted(files)} have no tokenizer.json.")
    return cls(tokenizers.Tokenizer.from_str(files["tokenizer.json"]), files)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def save(self, directory: str) -> list[str]:
    """Writes every file of `files` (tokenizer.json at least); returns their names."""
    paths.makedirs(directory)
    for name, text in self.files.items():
      paths.write_text(paths.join(directory, name), text)
    return sorted(self.files)


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 300) -> Tokenizer:
  """Byte-level BPE with `vocab_size` learned ids, then `<image>`, EOS, `<|im_start|>`,
  `<|im_end|>` at ids vocab_size .. vocab_size+3 (deterministic for a given corpus)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(corpus), trainer)
  if tok.get_vocab_size() != vocab_size:
    raise ValueError(f"corpus too small for a {vocab_size}-token BPE "
                     f"(got {tok.get_vocab_size()}).")
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return Tokenizer(tok)
