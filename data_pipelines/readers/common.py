"""Shared pieces of the dataset readers: the error type, the registry and file checks.

Readers never decode images by default (MARS alone has about 1.2M frames): they check that every
listed frame exists and is not empty (`check_files="size"`: one directory scan per folder plus one
stat per frame; "exists" skips the stats, "none" skips the check). Decoding every frame with PIL
is opt-in (`verify_images=True`, used by `python -m data_pipelines.inspect --verify`).
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Sequence

from data_pipelines.tracklets import Split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")

Reader = Callable[..., Split]
_REGISTRY: dict[str, Reader] = {}


class DatasetError(ValueError):
  """A dataset on disk does not have the layout or contents a reader expects.

  A user error: `main.py` prints its message without a traceback (`stmn_jax.errors.USER_ERRORS`
  names it; this layer imports nothing of stmn_jax).
  """


def register(name: str) -> Callable[[Reader], Reader]:
  """Decorator: registers `read(root, **kwargs) -> Split` under `name`."""

  def wrap(fn: Reader) -> Reader:
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"a dataset reader named {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn

  return wrap


def registry() -> dict[str, Reader]:
  return _REGISTRY


# ------------------------------------------------------------------ paths and layout errors


def missing(path: str, what: str, layout: str) -> DatasetError:
  """An error for a missing file or folder, with the expected layout as a short tree."""
  return DatasetError(f"{what} not found: expected {path!r}.\nExpected layout:\n{layout.rstrip()}")


def require_dir(path: str, what: str, layout: str) -> str:
  if not os.path.isdir(path):
    raise missing(path, what, layout)
  return path


def require_file(path: str, what: str, layout: str) -> str:
  if not os.path.isfile(path):
    raise missing(path, what, layout)
  return path


def first_existing(candidates: Sequence[str], what: str, layout: str) -> str:
  """The first of `candidates` that exists; else an error naming all of them."""
  for c in candidates:
    if os.path.exists(c):
      return c
  if len(candidates) == 1:
    raise missing(candidates[0], what, layout)
  raise DatasetError(
      f"{what} not found: expected one of {list(candidates)!r}.\nExpected layout:\n"
      f"{layout.rstrip()}"
  )


def is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def sorted_subdirs(path: str) -> list[str]:
  """Names of the sub-folders of `path`, sorted."""
  return sorted(e.name for e in os.scandir(path) if e.is_dir())


def natural_key(name: str) -> tuple:
  """Sort key comparing digit runs as numbers: 'f2.png' < 'f10.png' (not padded names)."""
  parts = re.split(r"(\d+)", name)
  return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts if p)


def read_lines(path: str) -> list[str]:
  """Non-empty stripped lines of a text file."""
  with open(path, "r", encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


# ------------------------------------------------------------------ file checks


CHECKS = ("size", "exists", "none")


class DirCache:
  """Per-folder listing {file name: size in bytes, or -1 if not asked}, each folder scanned once.

  Sizes cost one stat per file (about 30 us here, vs about 5 us per file for the listing).
  """

  def __init__(self, sizes: bool = True):
    self._sizes = sizes
    self._dirs: dict[str, dict[str, int] | None] = {}

  def listing(self, folder: str) -> dict[str, int] | None:
    if folder not in self._dirs:
      try:
        with os.scandir(folder) as it:
          self._dirs[folder] = {e.name: (e.stat().st_size if self._sizes else -1)
                                for e in it if e.is_file()}
      except (FileNotFoundError, NotADirectoryError):
        self._dirs[folder] = None
    return self._dirs[folder]


def check_files(paths: Iterable[str], cache: DirCache | None = None) -> None:
  """Every path exists and is not empty; else a DatasetError naming the first bad file."""
  cache = cache or DirCache()
  last_folder, listing = None, None
  for p in paths:
    folder, _, name = p.rpartition(os.sep)
    if folder != last_folder:
      last_folder, listing = folder, cache.listing(folder)
      if listing is None:
        raise DatasetError(f"frame folder {folder!r} does not exist (needed for {p!r})")
    size = listing.get(name)
    if not size:
      raise DatasetError(f"frame file {p!r} " + ("does not exist" if size is None else
                                                  "is empty (0 bytes)"))


def verify_images(paths: Iterable[str]) -> None:
  """Decodes every image with PIL; a DatasetError names the first unreadable file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for p in paths:
    try:
      with Image.open(p) as im:
        im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
      raise DatasetError(f"unreadable image {p!r}: {type(e).__name__}: {e}") from e


def check_split(split: Split, verify: bool, check: str = "size") -> Split:
  """Checks every frame of `split`: `check` "size" (exists and is not empty), "exists" (in its
  folder's listing) or "none"; `verify` also decodes every frame with PIL (slow)."""
  if check not in CHECKS:
    raise DatasetError(f"check_files={check!r}: expected one of {CHECKS}")
  if check != "none":
    cache = DirCache(sizes=check == "size")
    for part in (split.train, split.query, split.gallery):
      for t in part:
        check_files(t.frames, cache)
  if verify:
    seen: set[str] = set()
    for part in (split.train, split.query, split.gallery):
      for t in part:
        new = [f for f in t.frames if f not in seen]
        seen.update(new)
        verify_images(new)
  return split


def load_mat(path: str, key: str):
  """`scipy.io.loadmat(path)[key]` (MATLAB v5 files); errors name the file and the key."""
  import scipy.io  # pylint: disable=g-import-not-at-top

  try:
    data = scipy.io.loadmat(path)
  except NotImplementedError as e:  # v7.3 (HDF5) files
    raise DatasetError(f"{path!r} is a MATLAB v7.3 file; expected a v5 .mat ({e})") from e
  except Exception as e:
    raise DatasetError(f"cannot read MATLAB file {path!r}: {type(e).__name__}: {e}") from e
  if key not in data:
    keys = sorted(k for k in data if not k.startswith("__"))
    raise DatasetError(f"{path!r} has no key {key!r} (keys: {keys})")
  return data[key]
