"""MARS (Zheng et al., ECCV 2016) in its released layout.

    <root>/
      bbox_train/<pid4>/<name>.jpg        e.g. 0001/0001C1T0001F001.jpg
      bbox_test/<pid4>/<name>.jpg         (pid 0000 distractors, 00-1 junk)
      info/train_name.txt                 one frame name per line
      info/test_name.txt
      info/tracks_train_info.mat          key track_train_info, rows [start, end, pid, cam]
      info/tracks_test_info.mat           key track_test_info
      info/query_IDX.mat                  key query_IDX: 1-based rows of track_test_info

`start` and `end` are 1-based inclusive line numbers of the name file; a frame's path is
`<bbox dir>/<name[:4]>/<name>`, `name[:4]` is its pid and `name[5]` its camera (1..6, stored as
0..5). Frame names carry the frame number after `F` (`...F001`); frames are sorted by it.
Rows with pid -1 (junk) are dropped, pid 0 (distractors) is kept unless `distractors=False`.

Gallery protocols:
- "official" (MATLAB MARS-evaluation, STMN, AP3D): every test tracklet but the junk, the query
  tracklets included (11,310 on the real data); the evaluation drops same-pid-same-camera items.
- "torchreid": the test tracklets minus the query rows (9,330; 140 queries lose their match).
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import tracklets as tl
from data_pipelines.readers import common
from data_pipelines.readers.common import DatasetError

LAYOUT = """\
<root>/
  bbox_train/<pid4>/<pid4>C<cam>T<track4>F<frame3>.jpg
  bbox_test/<pid4>/...
  info/{train_name.txt, test_name.txt, tracks_train_info.mat, tracks_test_info.mat, query_IDX.mat}
"""
PROTOCOLS = ("official", "torchreid")


def _frame_number(name: str, source: str) -> int:
  """'0001C1T0001F012.jpg' -> 12 (the digits after the last 'F')."""
  start, end = name.rfind("F") + 1, name.rfind(".")
  digits = name[start:end if end > start else len(name)]
  if start == 0 or not digits.isdigit():
    raise DatasetError(f"{source}: frame name {name!r} has no frame number (F<digits>)")
  return int(digits)


def _track_rows(path: str, key: str) -> np.ndarray:
  rows = np.asarray(common.load_mat(path, key))
  if rows.ndim != 2 or rows.shape[1] != 4:
    raise DatasetError(f"{path!r}: {key} has shape {rows.shape}, expected (N, 4) rows "
                       "[start, end, pid, camid]")
  return rows.astype(np.int64)


def _tracklets(
    rows: np.ndarray, names: list[str], bbox_dir: str, name_file: str, info_file: str
) -> list[tl.Tracklet | None]:
  """One Tracklet per row (None for pid -1 junk rows)."""
  out: list[tl.Tracklet | None] = []
  for i, (start, end, pid, cam) in enumerate(rows.tolist()):
    if pid == -1:
      out.append(None)
      continue
    where = f"{info_file!r} row {i + 1} [start={start}, end={end}, pid={pid}, camid={cam}]"
    if not 1 <= start <= end <= len(names):
      raise DatasetError(f"{where}: frame range outside 1..{len(names)} (lines of "
                         f"{name_file!r}) or empty")
    frame_names = names[start - 1:end]
    pids = {n[:4] for n in frame_names}
    cams = {n[5:6] for n in frame_names}
    if len(pids) != 1 or len(cams) != 1:
      raise DatasetError(f"{where}: frames disagree on pid {sorted(pids)} / camera "
                         f"{sorted(cams)} (names {frame_names[0]!r} ... {frame_names[-1]!r} "
                         f"in {name_file!r})")
    name_pid, name_cam = pids.pop(), cams.pop()
    if not (name_pid.lstrip("-").isdigit() and int(name_pid) == pid and name_cam.isdigit()
            and int(name_cam) == cam):
      raise DatasetError(f"{where}: frame names say pid {name_pid!r}, camera {name_cam!r}")
    numbers = [_frame_number(n, name_file) for n in frame_names]
    if any(a > b for a, b in zip(numbers, numbers[1:])):
      frame_names = [n for _, n in sorted(zip(numbers, frame_names))]
    folder = os.path.join(bbox_dir, name_pid)
    frames = tuple(f"{folder}{os.sep}{n}" for n in frame_names)
    out.append(tl.Tracklet(frames=frames, pid=int(pid), camid=int(cam) - 1))
  return out


@common.register("mars")
def read(
    root: str,
    protocol: str = "official",
    distractors: bool = True,
    verify_images: bool = False,
    check_files: str = "size",
) -> tl.Split:
  """Reads MARS under `root` (layout in the module docstring) -> Split("mars", ...).

  `protocol`: "official" or "torchreid" gallery; `distractors=False` drops pid 0 from query and
  gallery; `check_files`: "size" (every frame exists and is not empty), "exists" or "none";
  `verify_images` also decodes every frame (slow).
  """
  if protocol not in PROTOCOLS:
    raise DatasetError(f"MARS protocol {protocol!r}: expected one of {PROTOCOLS}")
  common.require_dir(root, "MARS root folder", LAYOUT)
  info = os.path.join(root, "info")
  paths = {
      k: common.require_file(os.path.join(info, f), f"MARS file info/{f}", LAYOUT)
      for k, f in [("train_names", "train_name.txt"), ("test_names", "test_name.txt"),
                   ("train_info", "tracks_train_info.mat"), ("test_info", "tracks_test_info.mat"),
                   ("query", "query_IDX.mat")]
  }
  train_dir = common.require_dir(os.path.join(root, "bbox_train"), "MARS folder bbox_train",
                                 LAYOUT)
  test_dir = common.require_dir(os.path.join(root, "bbox_test"), "MARS folder bbox_test", LAYOUT)

  train = _tracklets(_track_rows(paths["train_info"], "track_train_info"),
                     common.read_lines(paths["train_names"]), train_dir, paths["train_names"],
                     paths["train_info"])
  test = _tracklets(_track_rows(paths["test_info"], "track_test_info"),
                    common.read_lines(paths["test_names"]), test_dir, paths["test_names"],
                    paths["test_info"])

  query_idx = np.asarray(common.load_mat(paths["query"], "query_IDX")).reshape(-1)
  query_idx = query_idx.astype(np.int64)
  bad = query_idx[(query_idx < 1) | (query_idx > len(test))]
  if bad.size:
    raise DatasetError(f"{paths['query']!r}: query_IDX values {bad[:5].tolist()} are outside "
                       f"1..{len(test)} (rows of tracks_test_info)")
  query_rows = list(dict.fromkeys((query_idx - 1).tolist()))  # file order, no repeats
  query_set = set(query_rows)

  keep = (lambda t: t is not None and (distractors or t.pid != 0))
  query = [test[i] for i in query_rows if keep(test[i])]
  if protocol == "official":
    gallery = [t for t in test if keep(t)]
  else:
    gallery = [t for i, t in enumerate(test) if i not in query_set and keep(t)]
  split = tl.Split(
      name="mars",
      train=tl.relabel(t for t in train if t is not None),
      query=tuple(query),
      gallery=tuple(gallery),
  )
  return common.check_split(split, verify_images, check_files)
