"""iLIDS-VID (Wang et al., ECCV 2014) in its released layout.

    <root>/                                            (e.g. ilids-vid/)
      i-LIDS-VID/sequences/cam1/<personXXX>/cam1_personXXX_<frame>.png
      i-LIDS-VID/sequences/cam2/<personXXX>/cam2_personXXX_<frame>.png
      train-test people splits/train_test_splits_ilidsvid.mat   key ls_set (10 x 300)

Row `split_id` of `ls_set` holds 1-based indices into the sorted cam1 person folder names: the
first half (150) are the test persons, the second half (150) the train persons. Query = cam1
(camid 0), gallery = cam2 (camid 1) of the test persons; train = both cameras of the train
persons. Frames are sorted by frame number; each frame name must name its camera and person.
`<root>` may also be the `i-LIDS-VID` folder itself when the splits folder sits next to
`sequences/`.
"""

from __future__ import annotations

import os
import re

import numpy as np

from data_pipelines import tracklets as tl
from data_pipelines.readers import common, two_camera
from data_pipelines.readers.common import DatasetError

LAYOUT = """\
<root>/
  i-LIDS-VID/sequences/cam1/person001/cam1_person001_00317.png ...
  i-LIDS-VID/sequences/cam2/person001/...
  train-test people splits/train_test_splits_ilidsvid.mat   (key ls_set, 10 x 300)
"""
SPLITS_FILE = os.path.join("train-test people splits", "train_test_splits_ilidsvid.mat")
_NAME_RE = re.compile(r"^cam(\d+)_person(\d+)_(\d+)\.", re.IGNORECASE)


def _check_name(path: str, person: str) -> None:
  m = _NAME_RE.match(os.path.basename(path))
  cam_dir = os.path.basename(os.path.dirname(os.path.dirname(path)))
  if not m:
    raise DatasetError(f"iLIDS-VID frame {path!r}: name does not match "
                       "cam<c>_person<p>_<frame>.png")
  if f"cam{int(m.group(1))}" != cam_dir or int(m.group(2)) != two_camera.person_number(person):
    raise DatasetError(f"iLIDS-VID frame {path!r}: its name disagrees with its folder "
                       f"({cam_dir}/{person})")


@common.register("ilidsvid")
def read(root: str, split_id: int = 0, verify_images: bool = False,
         check_files: str = "size") -> tl.Split:
  """Reads split `split_id` (0..9) of iLIDS-VID under `root` -> Split("ilidsvid", ...).

  `verify_images` / `check_files`: see `common.check_split`.
  """
  common.require_dir(root, "iLIDS-VID root folder", LAYOUT)
  seq = common.first_existing(
      [os.path.join(root, "i-LIDS-VID", "sequences"), os.path.join(root, "sequences")],
      "iLIDS-VID folder sequences", LAYOUT)
  cam_dirs = [common.require_dir(os.path.join(seq, c), f"iLIDS-VID folder {c}", LAYOUT)
              for c in ("cam1", "cam2")]
  mat = common.first_existing(
      [os.path.join(root, SPLITS_FILE), os.path.join(os.path.dirname(seq), SPLITS_FILE)],
      "iLIDS-VID split file", LAYOUT)
  ls_set = np.asarray(common.load_mat(mat, "ls_set"))
  if ls_set.ndim != 2 or ls_set.shape[1] % 2:
    raise DatasetError(f"{mat!r}: ls_set has shape {ls_set.shape}, expected (splits, 2 * n)")
  if not 0 <= split_id < ls_set.shape[0]:
    raise DatasetError(f"iLIDS-VID split_id {split_id}: expected 0..{ls_set.shape[0] - 1} "
                       f"(rows of ls_set in {mat!r})")
  persons = common.sorted_subdirs(cam_dirs[0])
  row = ls_set[split_id].astype(np.int64)
  bad = row[(row < 1) | (row > len(persons))]
  if bad.size:
    raise DatasetError(f"{mat!r}: ls_set row {split_id} has indices {bad[:5].tolist()} outside "
                       f"1..{len(persons)} (person folders in {cam_dirs[0]!r})")
  half = row.size // 2
  test = [persons[i - 1] for i in sorted(row[:half].tolist())]
  train = [persons[i - 1] for i in sorted(row[half:].tolist())]
  split = two_camera.split("ilidsvid", cam_dirs, train, test, _check_name)
  return common.check_split(split, verify_images, check_files)
