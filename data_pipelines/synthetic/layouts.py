"""Where the frames go: the MARS and DukeMTMC-VideoReID on-disk layouts.

MARS::

  bbox_train/<pid4>/<pid4>C<cam>T<tracklet4>F<frame3>.jpg   (bbox_test/ likewise)
  info/train_name.txt, info/test_name.txt      one frame name per line, tracklet after tracklet
  info/tracks_train_info.mat  key track_train_info: (N, 4) rows [start, end, pid, camera],
  info/tracks_test_info.mat   key track_test_info   start/end 1-based inclusive lines of the
                                                    name file, camera 1-based
  info/query_IDX.mat          key query_IDX: 1-based rows of track_test_info

`<pid4>` is the zero-padded pid, `00-1` for junk (pid -1), as in MARS. The arrays are stored as
int32 (integer-valued, so readers that cast them and readers that slice with them both work).

DukeV::

  {train,query,gallery}/<pid4>/<tracklet4>/<pid4>_C<cam>_F<frame4>_X<n>.jpg

As in the released DukeV, the gallery folder also holds a copy of every query tracklet (same
pid and tracklet folder), so its gallery is every test tracklet once. Junk tracklets are not
written (DukeV has none); pid 0 distractors go to gallery/0000.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class TrackLike(Protocol):
  pid: int
  camera: int  # 1-based
  number: int  # tracklet number (per pid and camera for MARS, per pid for DukeV)
  length: int
  split: str  # "train" or "test"
  query: bool


def pid4(pid: int) -> str:
  """0-padded 4-character pid; MARS spells the junk pid -1 as '00-1'."""
  if pid == -1:
    return "00-1"
  if not 0 <= pid <= 9999:
    raise ValueError(f"pid {pid} does not fit the 4-digit file names (expected -1..9999)")
  return f"{pid:04d}"


def mars_name(pid: int, camera: int, number: int, frame: int) -> str:
  """e.g. (1, 1, 1, 1) -> '0001C1T0001F001.jpg' (name[:4] = pid, name[5] = camera)."""
  return f"{pid4(pid)}C{camera}T{number:04d}F{frame:03d}.jpg"


def dukev_name(pid: int, camera: int, frame: int, x: int) -> str:
  """e.g. (1, 6, 99, 30823) -> '0001_C6_F0099_X30823.jpg' (name[6] = camera)."""
  return f"{pid4(pid)}_C{camera}_F{frame:04d}_X{x:05d}.jpg"


def dukev_folder(track: TrackLike) -> str:
  if track.split == "train":
    return "train"
  return "query" if track.query else "gallery"


def frame_paths(tracks: Sequence[TrackLike], layout: str) -> list[list[str]]:
  """Relative frame paths of every tracklet (frames numbered from 1), in the layout's scheme."""
  out = []
  if layout == "mars":
    for t in tracks:
      home = "bbox_train" if t.split == "train" else "bbox_test"
      out.append([f"{home}/{pid4(t.pid)}/{mars_name(t.pid, t.camera, t.number, f)}"
                  for f in range(1, t.length + 1)])
  elif layout == "dukev":
    x = 0
    for t in tracks:
      folder = f"{dukev_folder(t)}/{pid4(t.pid)}/{t.number:04d}"
      paths = []
      for f in range(1, t.length + 1):
        x += 1
        paths.append(f"{folder}/{dukev_name(t.pid, t.camera, f, x)}")
      out.append(paths)
  else:
    raise ValueError(f"unknown layout {layout!r}: expected 'mars' or 'dukev'")
  return out


def dukev_gallery_copy(paths: Sequence[str]) -> list[str]:
  """The gallery/ copy of a DukeV query tracklet's frame paths."""
  return ["gallery/" + p.split("/", 1)[1] for p in paths]


def mars_tables(tracks: Sequence[TrackLike], paths: Sequence[Sequence[str]]) -> dict:
  """The MARS `info/` contents: name lists, track info arrays and query indices.

  Returns {"train_name": [...], "test_name": [...], "track_train_info": (N,4) int32,
  "track_test_info": (M,4) int32, "query_IDX": (Q,) int32}.
  """
  names = {"train": [], "test": []}
  rows = {"train": [], "test": []}
  query = []
  for t, p in zip(tracks, paths):
    lst = names[t.split]
    start = len(lst) + 1
    lst.extend(os.path.basename(x) for x in p)
    rows[t.split].append((start, len(lst), t.pid, t.camera))
    if t.split == "test" and t.query:
      query.append(len(rows["test"]))
  as_rows = lambda r: np.asarray(r, np.int32).reshape(-1, 4)
  return {
      "train_name": names["train"],
      "test_name": names["test"],
      "track_train_info": as_rows(rows["train"]),
      "track_test_info": as_rows(rows["test"]),
      "query_IDX": np.asarray(query, np.int32),
  }


_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by stmn_jax data_pipelines.synthetic"


def savemat_deterministic(path: str, arrays: dict[str, np.ndarray]) -> None:
  """scipy.io.savemat, with the header's creation time replaced by a fixed text.

  The first 116 bytes of a MAT 5 file are free descriptive text; scipy puts the time there,
  which would make two runs with the same seed differ.
  """
  import io  # pylint: disable=g-import-not-at-top
  import scipy.io  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  scipy.io.savemat(buf, arrays)
  data = bytearray(buf.getvalue())
  data[:116] = _MAT_HEADER.ljust(116, b" ")
  with open(path, "wb") as f:
    f.write(bytes(data))


def write_mars_info(root: str, tables: dict) -> None:
  """Writes `root/info/` (name lists and the three .mat files)."""
  info = os.path.join(root, "info")
  os.makedirs(info, exist_ok=True)
  for split in ("train", "test"):
    with open(os.path.join(info, f"{split}_name.txt"), "w") as f:
      f.writelines(n + "\n" for n in tables[f"{split}_name"])
  savemat_deterministic(os.path.join(info, "tracks_train_info.mat"),
                        {"track_train_info": tables["track_train_info"]})
  savemat_deterministic(os.path.join(info, "tracks_test_info.mat"),
                        {"track_test_info": tables["track_test_info"]})
  savemat_deterministic(os.path.join(info, "query_IDX.mat"), {"query_IDX": tables["query_IDX"]})
