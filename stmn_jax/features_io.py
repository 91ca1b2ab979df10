"""The extracted-features files of `--mode=extract`: `NAME.npy` plus its index `NAME.csv`.

`NAME.npy` holds float (T, D) embeddings, one row per tracklet; the sibling `NAME.csv` has the
header `tracklet,pid,camera,num_frames,first_frame` (`INDEX_COLUMNS`) and one row per embedding
row, in the same order. `write_features` writes both, `read_features` reads and checks both
(every error names the file and what was expected), `read_arrays` gives the (feats, pids,
camids) arrays that the ranking needs. Paths may be local or in an object store (`gs://...`):
every access goes through `etils.epath`; the index is written in one write.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence

import numpy as np
from etils import epath

from stmn_jax import workdir_io

INDEX_COLUMNS = ("tracklet", "pid", "camera", "num_frames", "first_frame")
_INT_COLUMNS = ("pid", "camera", "num_frames")


class MissingFileError(FileNotFoundError, ValueError):
  """A features .npy or its index .csv is not there (both a FileNotFoundError and a
  ValueError, so callers that catch either keep working)."""


def index_path(npy_path: str) -> str:
  """`DIR/NAME.npy` -> `DIR/NAME.csv`, the index beside it."""
  return os.path.splitext(npy_path)[0] + ".csv"  # a string operation: any path, any URI


def write_features(
    npy_path: str, feats: Any, names: Sequence[str], tracklets: Sequence[Any]
) -> tuple[str, str]:
  """(T, D) float embeddings, T names and T tracklets -> `npy_path` and its index CSV.

  A tracklet has `.pid`, `.camid`, `.num_frames` and `.frames` (the first frame's path is
  written). Creates the folder. Returns (npy_path, csv_path).
  """
  if not str(npy_path).endswith(".npy"):
    raise ValueError(f"{npy_path}: expected a path ending in .npy")
  feats = np.asarray(feats)
  if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
    raise ValueError(f"{npy_path}: expected (T, D) float embeddings to write, got {feats.dtype} "
                     f"{feats.shape}")
  if not len(names) == len(tracklets) == feats.shape[0]:
    raise ValueError(f"{npy_path}: {feats.shape[0]} embeddings but {len(names)} names and "
                     f"{len(tracklets)} tracklets (expected one of each per row)")
  csv_path = index_path(npy_path)
  epath.Path(npy_path).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(npy_path).open("wb") as f:
    np.save(f, feats)
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(INDEX_COLUMNS)
  for name, t in zip(names, tracklets):
    writer.writerow([name, t.pid, t.camid, t.num_frames, t.frames[0]])
  epath.Path(csv_path).write_text(text.getvalue())
  return npy_path, csv_path


def read_features(npy_path: str, mmap: bool = False) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """`NAME.npy` and `NAME.csv` -> (feats, rows).

  feats: (T, D) float32, or with mmap the stored array as a read-only memory map
  (`np.load(mmap_mode="r")`, read when used; an object-store file is read whole). rows: one
  dict per embedding row with tracklet (str), pid, camera, num_frames (int) and first_frame
  (str). Raises `MissingFileError` for a
  missing .npy or .csv and ValueError for anything else that is not what --mode=extract writes.
  """
  feats = _read_npy(npy_path, mmap)
  rows = _read_index(index_path(npy_path), npy_path)
  if len(rows) != feats.shape[0]:
    raise ValueError(f"{index_path(npy_path)}: {len(rows)} rows but {npy_path} has "
                     f"{feats.shape[0]} embeddings (expected one row per embedding)")
  return feats, rows


def read_arrays(npy_path: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`read_features` -> (feats (T, D), pids (T,) int64, camids (T,) int64)."""
  feats, rows = read_features(npy_path, mmap=mmap)
  pids = np.asarray([r["pid"] for r in rows], np.int64)
  camids = np.asarray([r["camera"] for r in rows], np.int64)
  return feats, pids, camids


def _load_npy(path: str, mmap: bool) -> Any:
  """np.load of a local file (memory-mapped with `mmap`) or of an object through epath."""
  if workdir_io.is_local(path):
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  with epath.Path(path).open("rb") as f:
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _read_npy(path: str, mmap: bool) -> np.ndarray:
  if not epath.Path(path).is_file():
    raise MissingFileError(f"{path}: no such file (expected the (T, D) features .npy written "
                           "by --mode=extract)")
  try:
    feats = _load_npy(path, mmap)
  except (*workdir_io.io_errors(), ValueError) as e:
    raise ValueError(f"{path}: cannot read as a .npy array with allow_pickle=False (expected "
                     f"the (T, D) float features of --mode=extract): {e}") from e
  if not isinstance(feats, np.ndarray):  # an .npz archive
    feats.close()
    raise ValueError(f"{path}: expected a .npy array of (T, D) float features, got an .npz "
                     "archive")
  if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
    raise ValueError(f"{path}: expected a 2-d float (T, D) array, got {feats.dtype} "
                     f"{feats.shape}")
  return feats if mmap else feats.astype(np.float32)


def _read_index(path: str, npy_path: str) -> list[dict[str, Any]]:
  if not epath.Path(path).is_file():
    raise MissingFileError(f"{path}: missing index CSV (written beside {npy_path} by "
                           f"--mode=extract, columns {','.join(INDEX_COLUMNS)})")
  with io.StringIO(epath.Path(path).read_text(), newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or not set(INDEX_COLUMNS) <= set(reader.fieldnames):
      raise ValueError(f"{path}: expected the header {','.join(INDEX_COLUMNS)}; got "
                       f"{','.join(reader.fieldnames) if reader.fieldnames else 'an empty file'}")
    rows = []
    for row in reader:
      line = reader.line_num
      if any(row[k] is None for k in INDEX_COLUMNS):
        raise ValueError(f"{path} line {line}: expected a value for each of "
                         f"{','.join(INDEX_COLUMNS)}, got {row}")
      try:
        ints = {k: int(row[k]) for k in _INT_COLUMNS}
      except ValueError as e:
        raise ValueError(f"{path} line {line}: pid, camera and num_frames must be integers, "
                         f"got {row}") from e
      rows.append({"tracklet": row["tracklet"], "pid": ints["pid"], "camera": ints["camera"],
                   "num_frames": ints["num_frames"], "first_frame": row["first_frame"]})
  return rows
