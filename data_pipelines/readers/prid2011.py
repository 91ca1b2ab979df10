"""PRID2011 (Hirzer et al., SCIA 2011), multi-shot part, with the iLIDS-VID authors' protocol.

    <root>/                                  (e.g. prid2011/)
      prid_2011/multi_shot/cam_a/person_0001/0001.png ...
      prid_2011/multi_shot/cam_b/person_0001/...
      splits_prid2011.json                   [{"train": [dir, ...], "test": [dir, ...]}, ...]

The split file (torchreid's format: person folder names) is not part of the dataset download.
`python -m data_pipelines.inspect --dataset=prid2011 --root=<root> --make-splits SEED` writes
one with `make_splits` below; `--splits-mat` converts the authors' own `train_test_splits_prid.mat`
(shipped in iLIDS-VID's "train-test people splits" folder) instead.

Query = cam_a (camid 0), gallery = cam_b (camid 1) of the test persons; train = both cameras of
the train persons. Frames (`0001.png`, ...) are sorted by frame number.

The protocol (Wang et al., ECCV 2014): only persons 1..200 appear in both cameras (folders with the
same number above 200 are different people); of those, the persons whose sequences are long
enough in both cameras are split at random into halves, 10 times. The paper's text says "more than
21 frames", but the count it reports (178 persons) is what a minimum of 27 frames per camera
gives; a minimum of 21 gives 183 (counts from a public loader that asserts both, not re-checked
here). So `min_frames` defaults to 27 and can be changed.
"""

from __future__ import annotations

import json
import os

import numpy as np

from data_pipelines import tracklets as tl
from data_pipelines.readers import common, two_camera
from data_pipelines.readers.common import DatasetError

LAYOUT = """\
<root>/
  prid_2011/multi_shot/cam_a/person_0001/0001.png ...
  prid_2011/multi_shot/cam_b/person_0001/...
  splits_prid2011.json   (not in the download: write it with python -m
      data_pipelines.inspect --dataset=prid2011 --root=<root> --make-splits SEED)
"""
SPLITS_FILE = "splits_prid2011.json"
NUM_SHARED_PERSONS = 200  # persons 1..200 are seen by both cameras
DEFAULT_MIN_FRAMES = 27
DEFAULT_NUM_SPLITS = 10


def camera_dirs(root: str) -> list[str]:
  """[cam_a, cam_b] folders under `root` (prid_2011/multi_shot or multi_shot)."""
  common.require_dir(root, "PRID2011 root folder", LAYOUT)
  shot = common.first_existing(
      [os.path.join(root, "prid_2011", "multi_shot"), os.path.join(root, "multi_shot")],
      "PRID2011 folder multi_shot", LAYOUT)
  return [common.require_dir(os.path.join(shot, c), f"PRID2011 folder {c}", LAYOUT)
          for c in ("cam_a", "cam_b")]


def eligible_persons(root: str, min_frames: int = DEFAULT_MIN_FRAMES) -> list[str]:
  """Sorted folders of persons 1..200 present in both cameras with >= min_frames in each."""
  cam_a, cam_b = camera_dirs(root)
  in_b = set(common.sorted_subdirs(cam_b))
  out = []
  for person in common.sorted_subdirs(cam_a):
    if person not in in_b or not 1 <= two_camera.person_number(person) <= NUM_SHARED_PERSONS:
      continue
    counts = [sum(1 for n in os.listdir(os.path.join(c, person)) if common.is_image(n))
              for c in (cam_a, cam_b)]
    if min(counts) >= min_frames:
      out.append(person)
  return out


def _write(root: str, splits: list[dict]) -> str:
  path = os.path.join(root, SPLITS_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(splits, f, indent=1)
  return path


def make_splits(
    root: str,
    seed: int,
    num_splits: int = DEFAULT_NUM_SPLITS,
    min_frames: int = DEFAULT_MIN_FRAMES,
) -> str:
  """Writes `num_splits` random half/half splits to `<root>/splits_prid2011.json`; its path.

  Persons: `eligible_persons(root, min_frames)` (178 on the real data). In each split a random
  permutation (NumPy PCG64 seeded with `seed`) gives the test half first (floor(n / 2) persons),
  the rest are train; both lists are sorted folder names.
  """
  persons = eligible_persons(root, min_frames)
  if len(persons) < 2:
    raise DatasetError(f"PRID2011 under {root!r}: only {len(persons)} persons 1..200 have "
                       f">= {min_frames} frames in both cameras; cannot split")
  rng = np.random.default_rng(seed)
  half = len(persons) // 2
  splits = []
  for _ in range(num_splits):
    perm = rng.permutation(len(persons))
    splits.append({"train": sorted(persons[i] for i in perm[half:]),
                   "test": sorted(persons[i] for i in perm[:half])})
  return _write(root, splits)


def splits_from_mat(root: str, mat_path: str, min_frames: int = DEFAULT_MIN_FRAMES) -> str:
  """Converts the authors' `train_test_splits_prid.mat` (key ls_set, 10 x 178) to the JSON file.

  Each row holds 1-based indices into the sorted eligible persons: first half test, second half
  train (the iLIDS-VID convention).
  """
  persons = eligible_persons(root, min_frames)
  ls_set = np.asarray(common.load_mat(mat_path, "ls_set")).astype(np.int64)
  if ls_set.ndim != 2 or ls_set.shape[1] != len(persons):
    raise DatasetError(f"{mat_path!r}: ls_set has shape {ls_set.shape}, expected (splits, "
                       f"{len(persons)}) for the {len(persons)} persons with >= {min_frames} "
                       "frames in both cameras")
  if ls_set.min() < 1 or ls_set.max() > len(persons):
    raise DatasetError(f"{mat_path!r}: ls_set indices outside 1..{len(persons)}")
  half = ls_set.shape[1] // 2
  splits = [{"train": sorted(persons[i - 1] for i in row[half:]),
             "test": sorted(persons[i - 1] for i in row[:half])} for row in ls_set.tolist()]
  return _write(root, splits)


def load_splits(path: str) -> list[dict]:
  with open(path, "r", encoding="utf-8") as f:
    try:
      splits = json.load(f)
    except json.JSONDecodeError as e:
      raise DatasetError(f"{path!r} is not valid JSON: {e}") from e
  ok = isinstance(splits, list) and all(
      isinstance(s, dict) and all(isinstance(s.get(k), list) and
                                  all(isinstance(x, str) for x in s[k]) for k in ("train", "test"))
      for s in splits)
  if not ok or not splits:
    raise DatasetError(f"{path!r}: expected a non-empty list of {{'train': [person dir, ...], "
                       "'test': [person dir, ...]}")
  return splits


@common.register("prid2011")
def read(root: str, split_id: int = 0, verify_images: bool = False,
         check_files: str = "size") -> tl.Split:
  """Reads split `split_id` of PRID2011 under `root` -> Split("prid2011", ...).

  `verify_images` / `check_files`: see `common.check_split`.
  """
  cam_dirs = camera_dirs(root)
  path = os.path.join(root, SPLITS_FILE)
  if not os.path.isfile(path):
    raise DatasetError(
        f"PRID2011 split file not found: expected {path!r}. It is not part of the dataset "
        f"download; write one with\n  python -m data_pipelines.inspect --dataset=prid2011 "
        f"--root={root} --make-splits SEED\n(or --splits-mat <iLIDS-VID>/'train-test people "
        f"splits'/train_test_splits_prid.mat for the authors' splits).\nExpected layout:\n"
        f"{LAYOUT.rstrip()}")
  splits = load_splits(path)
  if not 0 <= split_id < len(splits):
    raise DatasetError(f"PRID2011 split_id {split_id}: expected 0..{len(splits) - 1} "
                       f"(splits in {path!r})")
  s = splits[split_id]
  split = two_camera.split("prid2011", cam_dirs, s["train"], s["test"])
  return common.check_split(split, verify_images, check_files)
