"""Read and write safetensors with numpy + ml_dtypes (bfloat16 included), never unpickling.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Reading memory-maps the file, so a tensor costs
memory only when it is used, and a sharded checkpoint (`model.safetensors.index.json`) is read
one tensor at a time.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its header).")
    (n,) = struct.unpack("<Q", raw)
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


class SafetensorsReader:
  """All tensors of a checkpoint directory (single file or sharded with an index)."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found.")
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      header, start = _read_header(path)
      for key, info in header.items():
        self._where[key] = (path, info, start)
    self._maps: dict[str, np.memmap] = {}

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    """A read-only view of one tensor (copy it before modifying)."""
    path, info, start = self._where[key]
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{key}: unsupported safetensors dtype {info['dtype']}.")
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    buf = self._maps[path][start + begin:start + end]
    return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes one safetensors file (tensors in the given order, C-contiguous)."""
  header, offset = {}, 0
  for key, array in tensors.items():
    array = np.asarray(array)
    if array.dtype not in NAMES:
      raise ValueError(f"{key}: dtype {array.dtype} cannot be stored in safetensors.")
    header[key] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                   "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data start to 8 bytes, as the reference does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())


def iter_shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> Iterator[dict]:
  """Groups tensors, in order, into shards of at most max_bytes (a lone big tensor excepted)."""
  shard, size = {}, 0
  for key, array in tensors.items():
    if shard and size + array.nbytes > max_bytes:
      yield shard
      shard, size = {}, 0
    shard[key] = array
    size += array.nbytes
  if shard:
    yield shard
