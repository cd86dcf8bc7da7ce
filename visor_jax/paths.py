"""One path layer for every file the project reads or writes: local paths and `gs://` URLs.

Paths stay strings everywhere (configs, logs, `Run.path`); this module decides per path how to
reach it. A local path goes through `os` and the builtin `open`, exactly as before (so
`abspath` keeps its meaning, and tests that spy on `open` still see every local file). A path
with a scheme (`gs://bucket/run`, any scheme `etils.epath` knows) goes through `etils.epath`,
the layer Orbax and tfds already use; without TensorFlow, epath reaches `gs://` through
fsspec's `gcsfs`. Orbax writes its arrays through tensorstore's own GCS driver.

What object stores cannot do, and what the code does instead:
  * append: `metrics.jsonl` is kept in memory and rewritten whole (`training/metrics.py`);
  * rename (write a temporary file, then replace): one object upload is already all or
    nothing, so `atomic_write` uploads in place;
  * symlinks: confinement of untrusted relative paths under a remote root is by string prefix
    after normalising `.`/`..` (`confine`).

docs/storage.md says which features work on `gs://` and how the fake-bucket test runs.
"""
from __future__ import annotations

import builtins
import os
import posixpath
import shutil
from typing import IO

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (`gs://...`) rather than a local path."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `etils.epath.Path` (what Orbax and tfds take)."""
  return epath.Path(os.fspath(path))


def _split_url(path: str) -> tuple[str, str]:
  """'gs://bucket/a/b' → ('gs://', 'bucket/a/b')."""
  scheme, rest = path.split("://", 1)
  return scheme + "://", rest


def normalize(path: PathLike) -> str:
  """Local: `os.path.abspath` (as the code always did). Remote: `.`, `..`, `//` and a trailing
  `/` resolved textually, never above the bucket."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.abspath(path)
  scheme, rest = _split_url(path)
  parts: list[str] = []
  for part in rest.split("/"):
    if part in ("", "."):
      continue
    if part == "..":
      if len(parts) > 1:  # the bucket is the root: '..' never leaves it
        parts.pop()
      continue
    parts.append(part)
  return scheme + "/".join(parts)


def join(path: PathLike, *names: str) -> str:
  """`os.path.join` for local paths; '/'-joined for URLs."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.join(path, *names)
  return posixpath.join(path, *names)


def dirname(path: PathLike) -> str:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.dirname(path)
  scheme, rest = _split_url(path.rstrip("/"))
  return scheme + posixpath.dirname(rest) if "/" in rest else path


def basename(path: PathLike) -> str:
  path = os.fspath(path)
  return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def exists(path: PathLike) -> bool:
  return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
  return as_path(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path: PathLike) -> None:
  """Creates `path` and its parents (exist_ok). On an object store directories are only name
  prefixes; gcsfs makes this a no-op inside an existing bucket."""
  if is_remote(path):
    as_path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
  """The names (not paths) directly under `path`. On an object store a directory is a name
  prefix, which exists only while something is under it: an empty (or just `makedirs`-made)
  one lists as [] instead of raising."""
  if is_remote(path):
    return [p.name for p in as_path(path).iterdir()] if isdir(path) else []
  return os.listdir(path)


def open(path: PathLike, mode: str = "r", encoding: str | None = None) -> IO:  # noqa: A001
  """A file object; text modes default to UTF-8 for URLs. Remote writes become visible when the
  file is closed. Remote append ('a') is not supported by object stores."""
  if not is_remote(path):
    return builtins.open(path, mode, encoding=encoding)
  if "a" in mode:
    raise ValueError(f"{path}: object stores cannot append (mode {mode!r}).")
  if "b" not in mode and encoding is None:
    encoding = "utf-8"
  return as_path(path).open(mode, encoding=encoding)


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
  with open(path, "r", encoding=encoding) as f:
    return f.read()


def read_bytes(path: PathLike) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
  with open(path, "w", encoding=encoding) as f:
    f.write(text)


def atomic_write(path: PathLike, data: str | bytes) -> None:
  """Readers see the old content or the new, never half. Local: a temporary file beside `path`,
  then `os.replace`. Remote: one object upload, which the store commits whole on close."""
  mode = "wb" if isinstance(data, bytes) else "w"
  if is_remote(path):
    with open(path, mode) as f:
      f.write(data)
    return
  tmp = os.fspath(path) + ".tmp"
  with builtins.open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
    f.write(data)
  os.replace(tmp, path)


def remove(path: PathLike) -> None:
  if is_remote(path):
    as_path(path).unlink()
  else:
    os.remove(path)


def rmtree(path: PathLike) -> None:
  if is_remote(path):
    as_path(path).rmtree()
  else:
    shutil.rmtree(path)


def copytree(src: PathLike, dst: PathLike) -> None:
  """Copies the directory `src` to `dst` (which must not exist), across stores if need be."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copytree(src, dst)
    return
  makedirs(dst)
  for name in listdir(src):
    s, d = join(src, name), join(dst, name)
    if isdir(s):
      copytree(s, d)
    else:
      as_path(s).copy(as_path(d))


class Unconfined(ValueError):
  """An untrusted relative path leads outside its root (or is absolute / a URL)."""


def confine(root: PathLike, relative: str) -> str:
  """The path to open for `relative` under `root`, refusing anything outside it.

  Local roots: real paths (`..` and symlinks resolved), compared by `os.path.commonpath`; the
  root may itself be a symlink. Remote roots (no symlinks on object stores): `.`/`..` resolved
  textually, refusing any step above the root, then the result must start with the
  normalised root plus '/' (so `gs://b/root2/x` is not under `gs://b/root`). Absolute paths,
  URLs and paths with NUL bytes are refused outright. Raises `Unconfined`.
  """
  root = os.fspath(root)
  if "\x00" in relative:
    raise Unconfined(f"path {relative!r} contains a NUL byte")
  if os.path.isabs(relative) or relative.startswith("/") or is_remote(relative):
    raise Unconfined(f"absolute path {relative!r} (paths must be relative to {root})")
  if is_remote(root):
    base = normalize(root)
    scheme, rest = _split_url(base)
    # normalize() never climbs above the bucket, so resolve '..' against the root's own parts
    # first: any '..' that would leave the root must be caught, not clamped.
    parts = rest.split("/")
    depth = len(parts)
    for part in relative.split("/"):
      if part in ("", "."):
        continue
      if part == "..":
        parts.pop()
        if len(parts) < depth:
          raise Unconfined(f"path {relative!r} leads outside {root}")
        continue
      parts.append(part)
    out = scheme + "/".join(parts)
    if not out.startswith(base + "/"):  # the string-prefix check, after normalisation
      raise Unconfined(f"path {relative!r} leads outside {root}")
    return out
  real_root = os.path.realpath(root)
  real = os.path.realpath(os.path.join(real_root, relative))
  if os.path.commonpath([real, real_root]) != real_root:
    raise Unconfined(f"path {relative!r} leads outside {root}")
  return real
