"""LS-VID (Li et al., ICCV 2019) in its released layout.

    <root>/                                         (the LS-VID folder)
      list_sequence/list_seq_train.txt              "<tracklet path prefix> <pid>" per line
      list_sequence/list_seq_test.txt
      test/data/info_test.mat                       MATLAB v7.3 (HDF5), key `query`
      tracklet_train/..., tracklet_test/...         the frames

Some toolkits move the lists and the .mat under `info/` (`info/list_sequence/...`,
`info/data/info_test.mat`); both places are accepted.

A tracklet's frames are the image files whose path starts with `<root>/<prefix>`, sorted by name
(digit runs compared as numbers). The camera is the third `_`-separated field of a frame's file
name (1..15, stored as 0..14) and must be the same for all frames of a tracklet. Rows with pid
-1 are dropped; train pids are relabelled.

Queries: `query` holds 1-based row numbers of list_seq_test.txt. MATLAB v7.3 stores matrices
transposed, so h5py returns the MATLAB column vector as a (1, N) array: its row 0 is the index
list (as the AP3D-family loaders read it). The gallery is the test rows that are not queries
(the dataset's own protocol: 3,504 queries and 7,829 gallery tracklets, disjoint).
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import tracklets as tl
from data_pipelines.readers import common
from data_pipelines.readers.common import DatasetError

LAYOUT = """\
<root>/
  list_sequence/{list_seq_train.txt, list_seq_test.txt}   (or info/list_sequence/...)
  test/data/info_test.mat                                  (or info/data/info_test.mat)
  tracklet_train/<...>/<prefix>*.jpg
  tracklet_test/<...>/<prefix>*.jpg
"""


def query_indices(path: str) -> np.ndarray:
  """0-based query rows from the v7.3 `info_test.mat` (h5py): row 0 of the stored array."""
  import h5py  # pylint: disable=g-import-not-at-top

  try:
    with h5py.File(path, "r") as f:
      if "query" not in f:
        raise DatasetError(f"{path!r} has no key 'query' (keys: {sorted(f.keys())})")
      arr = np.asarray(f["query"])
  except OSError as e:
    raise DatasetError(f"cannot read {path!r} as a MATLAB v7.3 (HDF5) file: {e}") from e
  if arr.ndim == 1:
    idx = arr
  elif arr.ndim == 2 and arr.shape[1] == 1 and arr.shape[0] > 1:
    idx = arr[:, 0]  # a MATLAB row vector (1, N) comes back as (N, 1)
  elif arr.ndim == 2:
    idx = arr[0, :]
  else:
    raise DatasetError(f"{path!r}: 'query' has shape {arr.shape}, expected a vector")
  if not np.all(np.equal(np.mod(idx, 1), 0)):
    raise DatasetError(f"{path!r}: 'query' holds non-integer values")
  return idx.astype(np.int64) - 1


def _rows(path: str) -> list[tuple[str, int]]:
  rows = []
  for i, line in enumerate(common.read_lines(path)):
    fields = line.split()
    if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
      raise DatasetError(f"{path!r} line {i + 1}: expected '<tracklet prefix> <pid>', got "
                         f"{line!r}")
    rows.append((fields[0], int(fields[1])))
  return rows


def _camera(path: str) -> int:
  fields = os.path.basename(path).split("_")
  if len(fields) < 3 or not fields[2].isdigit():
    raise DatasetError(f"LS-VID frame {path!r}: no camera number in the third '_' field")
  return int(fields[2])


def _tracklets(root: str, list_file: str, cache: common.DirCache) -> list[tl.Tracklet | None]:
  """One Tracklet per line of `list_file` (None for pid -1)."""
  out: list[tl.Tracklet | None] = []
  for i, (prefix, pid) in enumerate(_rows(list_file)):
    if pid == -1:
      out.append(None)
      continue
    full = os.path.join(root, prefix)
    folder, stem = os.path.split(full)
    listing = cache.listing(folder)
    if listing is None:
      raise DatasetError(f"{list_file!r} line {i + 1}: folder {folder!r} does not exist")
    names = sorted((n for n in listing if n.startswith(stem) and common.is_image(n)),
                   key=common.natural_key)
    if not names:
      raise DatasetError(f"{list_file!r} line {i + 1}: no frames match {full + '*'!r} "
                         "(empty tracklet)")
    frames = tuple(os.path.join(folder, n) for n in names)
    cams = {_camera(f) for f in frames}
    if len(cams) != 1:
      raise DatasetError(f"LS-VID tracklet {full!r}: frames disagree on the camera "
                         f"{sorted(cams)}")
    out.append(tl.Tracklet(frames=frames, pid=pid, camid=cams.pop() - 1))
  return out


@common.register("lsvid")
def read(root: str, verify_images: bool = False,
         check_files: str = "size") -> tl.Split:
  """Reads LS-VID under `root` (layout in the module docstring) -> Split("lsvid", ...).

  `verify_images` / `check_files`: see `common.check_split`.
  """
  common.require_dir(root, "LS-VID root folder", LAYOUT)
  lists = common.first_existing(
      [os.path.join(root, "list_sequence"), os.path.join(root, "info", "list_sequence")],
      "LS-VID folder list_sequence", LAYOUT)
  train_list = common.require_file(os.path.join(lists, "list_seq_train.txt"),
                                   "LS-VID train list", LAYOUT)
  test_list = common.require_file(os.path.join(lists, "list_seq_test.txt"),
                                  "LS-VID test list", LAYOUT)
  info = common.first_existing(
      [os.path.join(root, "test", "data", "info_test.mat"),
       os.path.join(root, "info", "data", "info_test.mat")],
      "LS-VID query file info_test.mat", LAYOUT)

  cache = common.DirCache(sizes=False)
  train = _tracklets(root, train_list, cache)
  test = _tracklets(root, test_list, cache)
  qidx = query_indices(info)
  bad = qidx[(qidx < 0) | (qidx >= len(test))]
  if bad.size:
    raise DatasetError(f"{info!r}: query values {(bad[:5] + 1).tolist()} are outside "
                       f"1..{len(test)} (lines of {test_list!r})")
  query_rows = list(dict.fromkeys(qidx.tolist()))
  query_set = set(query_rows)
  split = tl.Split(
      name="lsvid",
      train=tl.relabel(t for t in train if t is not None),
      query=tuple(test[i] for i in query_rows if test[i] is not None),
      gallery=tuple(t for i, t in enumerate(test) if i not in query_set and t is not None),
  )
  return common.check_split(split, verify_images, check_files)
