"""The split logic shared by the two-camera datasets (iLIDS-VID, PRID2011).

A person folder `<cam dir>/<person dir>/` holds one tracklet. For a split given as person folder
names: query = first camera of the test persons, gallery = second camera of the test persons,
train = both cameras of the train persons (pids relabelled 0..C-1). Test pids keep the raw
number of the person folder (`person001` -> 1, `person_0001` -> 1).
"""

from __future__ import annotations

import os
import re
from typing import Callable, Sequence

from data_pipelines import tracklets as tl
from data_pipelines.readers.common import DatasetError, is_image, natural_key

_DIGITS = re.compile(r"(\d+)")


def person_number(person_dir: str) -> int:
  """'person001' -> 1; errors name the folder when it has no number."""
  m = _DIGITS.findall(os.path.basename(person_dir))
  if not m:
    raise DatasetError(f"person folder {person_dir!r} has no number in its name")
  return int(m[-1])


def frame_files(person_dir: str) -> list[str]:
  """Image names of a person folder sorted by frame number (digit runs as numbers)."""
  if not os.path.isdir(person_dir):
    raise DatasetError(f"person folder {person_dir!r} does not exist")
  names = sorted((n for n in os.listdir(person_dir) if is_image(n)), key=natural_key)
  if not names:
    raise DatasetError(f"person folder {person_dir!r} holds no images (empty tracklet)")
  return names


def tracklet(
    cam_dir: str,
    person: str,
    camid: int,
    check_name: Callable[[str, str], None] | None = None,
) -> tl.Tracklet:
  """The tracklet of `person` in `cam_dir`; `check_name(path, person)` validates each frame."""
  folder = os.path.join(cam_dir, person)
  names = frame_files(folder)
  frames = tuple(os.path.join(folder, n) for n in names)
  if check_name is not None:
    for f in frames:
      check_name(f, person)
  return tl.Tracklet(frames=frames, pid=person_number(person), camid=camid)


def split(
    name: str,
    cam_dirs: Sequence[str],
    train_persons: Sequence[str],
    test_persons: Sequence[str],
    check_name: Callable[[str, str], None] | None = None,
) -> tl.Split:
  """Query = cam 0 / gallery = cam 1 of `test_persons`; train = both cameras of the rest."""
  overlap = sorted(set(train_persons) & set(test_persons))
  if overlap:
    raise DatasetError(f"{name} split: persons {overlap[:5]} are in both train and test")
  train = [tracklet(d, p, c, check_name) for p in train_persons for c, d in enumerate(cam_dirs)]
  query = [tracklet(cam_dirs[0], p, 0, check_name) for p in test_persons]
  gallery = [tracklet(cam_dirs[1], p, 1, check_name) for p in test_persons]
  return tl.Split(name=name, train=tl.relabel(train), query=tuple(query), gallery=tuple(gallery))
