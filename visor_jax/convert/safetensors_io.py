"""Read and write safetensors with numpy + ml_dtypes (bfloat16 included), never unpickling.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Reading memory-maps the file, so a tensor costs
memory only when it is used, and a sharded checkpoint (`model.safetensors.index.json`) is read
one tensor at a time. A remote checkpoint (gs://, through `paths`) is read the same way, one
ranged read per tensor.

A downloaded checkpoint is untrusted: the index's shard names must stay inside the checkpoint
directory, and a file that is not safetensors (a pickle, garbage) is refused by its header,
before anything else of it is read.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from visor_jax import paths

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


def _not_safetensors(path: str, why: str) -> ValueError:
  return ValueError(f"not a safetensors file: {path} ({why}).")


def _read_header(path: str) -> tuple[dict, int]:
  """(tensor entries, data start). The header length is checked against the file size before
  it is read, so a pickle or garbage fails here, never as a huge read or a decode error."""
  if paths.is_remote(path):  # object stores hold regular objects only
    size = paths.as_path(path).stat().length
  else:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
      raise _not_safetensors(path, "not a regular file")
    size = st.st_size
  with paths.open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise _not_safetensors(path, "shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, MAX_HEADER_BYTES):
      raise _not_safetensors(path, f"header length {n} does not fit a {size}-byte file")
    blob = f.read(n)
  try:
    header = json.loads(blob.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError, JSONDecodeError
    raise _not_safetensors(path, "its header is not JSON") from None
  if not isinstance(header, dict):
    raise _not_safetensors(path, "its header is not a JSON object")
  header.pop("__metadata__", None)
  for key, info in header.items():
    _check_entry(path, key, info, size - 8 - n)
  return header, 8 + n


def _check_entry(path: str, key: str, info, data_bytes: int) -> None:
  """A tensor's entry is well-formed and its bytes lie inside the file (so `get` can slice)."""
  try:
    begin, end = info["data_offsets"]
    ok = (isinstance(info["dtype"], str) and all(isinstance(d, int) and d >= 0
                                                 for d in info["shape"])
          and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes)
  except (TypeError, KeyError, ValueError):
    ok = False
  if not ok:
    raise _not_safetensors(path, f"bad header entry for tensor {key!r}")


def _shard_files(directory: str, index: str) -> list[str]:
  """The index's shard names, each checked to stay inside `directory`."""
  try:
    with paths.open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (ValueError, KeyError, TypeError):
    weight_map = None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names.")
  names = sorted(set(weight_map.values()))
  for name in names:
    _check_inside(directory, name, index)
  return names


def _check_inside(directory: str, name: str, index: str) -> None:
  """Refuses a shard name that is absolute or whose real path (`..`, symlinks) leaves the
  directory: the index is untrusted, and must not make us open files elsewhere. A Hugging Face
  cache snapshot (`<repo>/snapshots/<rev>/`) links its files to `<repo>/blobs/`, allowed too.
  A remote directory has no links: `paths.confine` (textual)."""
  if paths.is_remote(directory):
    try:
      paths.confine(directory, name)
    except paths.Unconfined:
      raise ValueError(f"{index}: shard {name!r} is outside the checkpoint directory "
                       f"{directory}; refusing to open it.") from None
    return
  real_dir = os.path.realpath(directory)
  allowed = [real_dir]
  if os.path.basename(os.path.dirname(real_dir)) == "snapshots":
    allowed.append(os.path.join(os.path.dirname(os.path.dirname(real_dir)), "blobs"))
  real = os.path.realpath(os.path.join(real_dir, name))  # resolves links; opens nothing
  if os.path.isabs(name) or not any(os.path.commonpath([real, a]) == a for a in allowed):
    raise ValueError(f"{index}: shard {name!r} is outside the checkpoint directory {directory}; "
                     "refusing to open it.")


class SafetensorsReader:
  """All tensors of a checkpoint directory (single file or sharded with an index)."""

  def __init__(self, directory: str):
    index = paths.join(directory, INDEX_FILE)
    single = paths.join(directory, SINGLE_FILE)
    if paths.exists(index):
      files = _shard_files(directory, index)
    elif paths.exists(single):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found.")
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = paths.join(directory, name)
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
    begin, end = info["data_offsets"]
    if paths.is_remote(path):
      with paths.open(path, "rb") as f:
        f.seek(start + begin)
        buf = np.frombuffer(f.read(end - begin), np.uint8)
    else:
      if path not in self._maps:
        self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
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
  with paths.open(path, "wb") as f:
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
