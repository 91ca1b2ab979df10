"""Tracklets given as folders: one sub-folder of frames per tracklet, optional labels CSV.

The input of `--mode=extract --input_dir=DIR` and `--mode=search --query=DIR`:
```
DIR/
  tracklets.csv        optional: columns tracklet, pid, camera (unlisted: pid -1, camera -1)
  <tracklet name>/     frames (JPEG / PNG / BMP), in file-name order
    0001.jpg ...
```
"""

from __future__ import annotations

import csv
import os
from typing import Any

from data_pipelines import frame_check
from data_pipelines.tracklets import Tracklet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
FOLDER_CSV = "tracklets.csv"


def _read_folder_labels(path: str) -> dict[str, tuple[int, int]]:
  """`tracklets.csv` (columns tracklet, pid, camera) -> {tracklet: (pid, camera)}."""
  labels = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    need = {"tracklet", "pid", "camera"}
    if reader.fieldnames is None or not need <= set(reader.fieldnames):
      raise ValueError(f"{path}: expected a header with columns tracklet, pid, camera; got "
                       f"{reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
      try:
        labels[row["tracklet"]] = (int(row["pid"]), int(row["camera"]))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{path} line {line}: pid and camera must be integers, got "
                         f"{row}") from e
  return labels


def read_folder(input_dir: str, verify: bool = True,
                flag: str = "--input_dir") -> tuple[list[str], list[Any]]:
  """(names, tracklets) of `input_dir`: one sub-folder of frames (JPEG / PNG / BMP) per tracklet.

  Frames are sorted by file name. An optional `input_dir/tracklets.csv` (tracklet, pid, camera)
  gives labels; unlabelled tracklets get pid -1, camera -1. Errors name the empty folder, the
  unreadable frames (`verify` decodes every frame as the pipeline does, `frame_check`) or the CSV row; `flag` names the folder's
  command-line flag.
  """
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"{flag}={input_dir}: not a folder")
  csv_path = os.path.join(input_dir, FOLDER_CSV)
  labels = _read_folder_labels(csv_path) if os.path.isfile(csv_path) else {}
  names = sorted(n for n in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, n)))
  if not names:
    raise ValueError(f"{flag}={input_dir}: no sub-folders (expected one per tracklet)")
  unknown = sorted(set(labels) - set(names))
  if unknown:
    raise ValueError(f"{csv_path}: tracklets {unknown[:5]} have no folder in {input_dir}")
  out = []
  for name in names:
    folder = os.path.join(input_dir, name)
    frames = sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
    )
    if not frames:
      raise ValueError(f"tracklet folder {folder} has no frames (expected "
                       f"{', '.join(IMAGE_EXTENSIONS)} files)")
    pid, camid = labels.get(name, (-1, -1))
    out.append(Tracklet(frames=tuple(frames), pid=pid, camid=camid))
  if verify:  # with the pipeline's own decoder, so what passes here reads in the pipeline
    frame_check.check_tracklets([(f"{flag} folder", out)], cache_dir=frame_check.NO_CACHE,
                                root=input_dir)
  return names, out
