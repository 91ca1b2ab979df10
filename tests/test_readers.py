"""Dataset readers on tiny native layouts written here (8x4 images, .mat / v7.3 / JSON files)."""

from __future__ import annotations

import json
import os
import sys
import types

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

import data_pipelines
from data_pipelines import readers
from data_pipelines import tracklets as tl
from data_pipelines.readers import DatasetError, dukev, ilidsvid, lsvid, mars, prid2011
from configs import default


def write_image(path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fmt = "PNG" if path.endswith(".png") else "JPEG"
  Image.new("RGB", (4, 8), (120, 30, 200)).save(path, fmt)
  return path


# ----------------------------------------------------------------------------- MARS

# (pid, cam, [frame numbers in name-file order]); listed out of order to test the sort.
MARS_TRAIN = [(1, 1, [3, 1, 2]), (1, 2, [1, 2]), (3, 1, [7]), (5, 3, [10, 2, 1, 4])]
MARS_TEST = [(2, 1, [1, 2]), (2, 2, [1, 2, 3]), (6, 1, [4]), (6, 2, [1, 2]), (0, 4, [1, 2]),
             (-1, 5, [1, 2])]
MARS_QUERY = [1, 3, 4]  # 1-based rows of the test info


def _mars_name(pid: int, cam: int, track: int, frame: int) -> str:
  return f"{pid:04d}C{cam}T{track:04d}F{frame:03d}.jpg" if pid >= 0 else \
      f"00-1C{cam}T{track:04d}F{frame:03d}.jpg"


def _mars_part(root: str, part: str, spec) -> tuple[list[str], np.ndarray]:
  names, rows = [], []
  for track, (pid, cam, frames) in enumerate(spec):
    start = len(names) + 1
    for f in frames:
      name = _mars_name(pid, cam, track, f)
      names.append(name)
      write_image(os.path.join(root, f"bbox_{part}", name[:4], name))
    rows.append([start, len(names), pid, cam])
  return names, np.asarray(rows, np.float64)


def write_mars(root: str, train=MARS_TRAIN, test=MARS_TEST, query=MARS_QUERY) -> str:
  os.makedirs(os.path.join(root, "info"), exist_ok=True)
  for part, spec in (("train", train), ("test", test)):
    names, rows = _mars_part(root, part, spec)
    with open(os.path.join(root, "info", f"{part}_name.txt"), "w") as f:
      f.write("\n".join(names) + "\n")
    scipy.io.savemat(os.path.join(root, "info", f"tracks_{part}_info.mat"),
                     {f"track_{part}_info": rows})
  scipy.io.savemat(os.path.join(root, "info", "query_IDX.mat"),
                   {"query_IDX": np.asarray([query], np.float64)})
  return root


def _pids_cams(ts):
  return sorted((t.pid, t.camid, t.num_frames) for t in ts)


def test_mars_official_protocol(tmp_path):
  root = write_mars(str(tmp_path / "MARS"))
  split = mars.read(root)
  assert split.name == "mars"
  # Train: pids relabelled 1,3,5 -> 0,1,2 in raw-pid order, cameras 0-based.
  assert _pids_cams(split.train) == sorted(
      ({1: 0, 3: 1, 5: 2}[p], c - 1, len(fr)) for p, c, fr in MARS_TRAIN)
  # Frames sorted by frame number, not name-file order; path <root>/bbox_train/<pid4>/<name>.
  t = [t for t in split.train if t.num_frames == 4][0]
  assert t.frames == tuple(os.path.join(root, "bbox_train", "0005", _mars_name(5, 3, 3, f))
                           for f in (1, 2, 4, 10))
  # Query: test rows 1, 3, 4; gallery: every test row but the junk, queries included.
  assert _pids_cams(split.query) == sorted(
      (MARS_TEST[i - 1][0], MARS_TEST[i - 1][1] - 1, len(MARS_TEST[i - 1][2])) for i in MARS_QUERY)
  assert _pids_cams(split.gallery) == sorted(
      (p, c - 1, len(fr)) for p, c, fr in MARS_TEST if p != -1)
  assert all(t.pid != -1 for t in split.gallery)
  assert 0 in {t.pid for t in split.gallery}  # distractors kept
  assert split.summary()["queries_without_match"] == 0
  assert split.summary()["splits"]["gallery"]["frames"] == sum(
      len(fr) for p, _, fr in MARS_TEST if p != -1)


def test_mars_torchreid_protocol_and_distractors(tmp_path):
  root = write_mars(str(tmp_path / "MARS"))
  split = mars.read(root, protocol="torchreid")
  expected = [(p, c - 1, len(fr)) for i, (p, c, fr) in enumerate(MARS_TEST, 1)
              if p != -1 and i not in MARS_QUERY]
  assert _pids_cams(split.gallery) == sorted(expected)
  # pid 6's two queries only match each other: both lose their match without the queries.
  assert split.summary()["queries_without_match"] == 2
  no_dis = mars.read(root, distractors=False)
  assert 0 not in {t.pid for t in no_dis.gallery}
  assert len(no_dis.gallery) == len(mars.read(root).gallery) - 1


def test_mars_missing_file_names_the_path(tmp_path):
  root = write_mars(str(tmp_path / "MARS"))
  os.remove(os.path.join(root, "info", "query_IDX.mat"))
  with pytest.raises(DatasetError, match="query_IDX.mat") as e:
    mars.read(root)
  assert os.path.join(root, "info", "query_IDX.mat") in str(e.value)
  assert "bbox_train" in str(e.value)  # the expected layout is shown
  with pytest.raises(DatasetError, match="nowhere"):
    mars.read(str(tmp_path / "nowhere"))


def test_mars_missing_frame_and_empty_frame(tmp_path):
  root = write_mars(str(tmp_path / "MARS"))
  frame = os.path.join(root, "bbox_test", "0002", _mars_name(2, 2, 1, 3))
  open(frame, "wb").close()
  with pytest.raises(DatasetError, match="empty") as e:
    mars.read(root)
  assert frame in str(e.value)
  assert mars.read(root, check_files="exists") == mars.read(root, check_files="none")
  os.remove(frame)
  for check in ("size", "exists"):
    with pytest.raises(DatasetError, match="does not exist") as e:
      mars.read(root, check_files=check)
    assert frame in str(e.value)
  assert frame in mars.read(root, check_files="none").gallery[1].frames
  with pytest.raises(DatasetError, match="check_files='all'"):
    mars.read(root, check_files="all")


def test_mars_pid_camera_mismatch(tmp_path):
  root = write_mars(str(tmp_path / "MARS"))
  info = os.path.join(root, "info", "tracks_train_info.mat")
  rows = scipy.io.loadmat(info)["track_train_info"]
  rows[0, 1] = 4  # row 1 now runs into pid 1's camera-2 tracklet
  scipy.io.savemat(info, {"track_train_info": rows})
  with pytest.raises(DatasetError, match="disagree") as e:
    mars.read(root)
  assert "tracks_train_info.mat" in str(e.value) and "row 1" in str(e.value)
  rows[0, 1], rows[0, 2] = 3, 7  # right range, wrong pid in the .mat
  scipy.io.savemat(info, {"track_train_info": rows})
  with pytest.raises(DatasetError, match="pid '0001'"):
    mars.read(root)


def test_mars_bad_query_index_and_key(tmp_path):
  root = write_mars(str(tmp_path / "MARS"), query=[1, 7])
  with pytest.raises(DatasetError, match=r"outside 1\.\.6"):
    mars.read(root)
  scipy.io.savemat(os.path.join(root, "info", "query_IDX.mat"), {"wrong": np.ones((1, 2))})
  with pytest.raises(DatasetError, match="no key 'query_IDX'"):
    mars.read(root)


def test_verify_images_names_the_unreadable_file(tmp_path):
  root = write_mars(str(tmp_path / "MARS"))
  frame = os.path.join(root, "bbox_train", "0003", _mars_name(3, 1, 2, 7))
  with open(frame, "wb") as f:
    f.write(b"not a jpeg at all")
  mars.read(root)  # the cheap check only looks at existence and size
  with pytest.raises(DatasetError, match="unreadable image") as e:
    mars.read(root, verify_images=True)
  assert frame in str(e.value)


# ----------------------------------------------------------------------------- DukeV


def _duke_name(pid, cam, frame, new_style):
  return (f"{pid:04d}_C{cam}_F{frame:04d}_X{frame + 30000}.jpg" if new_style
          else f"{pid:04d}C{cam}F{frame:04d}X{frame + 30000}.jpg")


# (part, pid, tracklet, cam, frames)
DUKE = [
    ("train", 1, 1, 6, [99, 100, 101]), ("train", 1, 2, 2, [2, 3]), ("train", 4, 5, 1, [7]),
    ("query", 2, 10, 1, [5, 6]), ("gallery", 2, 10, 1, [5, 6]), ("gallery", 2, 11, 3, [1]),
    ("query", 3, 30, 1, [1, 2]), ("gallery", 3, 31, 2, [4]), ("gallery", 0, 40, 5, [1, 2, 3]),
]


def write_dukev(root: str, new_style: bool = False) -> str:
  for part, pid, track, cam, frames in DUKE:
    for f in frames:
      write_image(os.path.join(root, part, f"{pid:04d}", f"{track:04d}",
                               _duke_name(pid, cam, f, new_style)))
  return root


@pytest.mark.parametrize("new_style", [False, True])
def test_dukev_both_name_styles(tmp_path, new_style):
  root = write_dukev(str(tmp_path / "DukeV"), new_style)
  split = dukev.read(root)
  assert _pids_cams(split.train) == sorted(
      ({1: 0, 4: 1}[p], c - 1, len(fr)) for part, p, _, c, fr in DUKE if part == "train")
  t = [t for t in split.train if t.num_frames == 3][0]  # starts at F0099, not F0001
  assert t.frames == tuple(os.path.join(root, "train", "0001", "0001", _duke_name(1, 6, f,
                                                                                  new_style))
                           for f in (99, 100, 101))
  assert _pids_cams(split.query) == [(2, 0, 2), (3, 0, 2)]
  # official: gallery folder + the query tracklet it lacks (0003/0030); 0002/0010 not twice.
  gallery = [(p, c - 1, len(fr)) for part, p, _, c, fr in DUKE if part == "gallery"]
  assert _pids_cams(split.gallery) == sorted(gallery + [(3, 0, 2)])
  torchreid = dukev.read(root, protocol="torchreid")
  assert _pids_cams(torchreid.gallery) == sorted(gallery)
  assert 0 not in {t.pid for t in dukev.read(root, distractors=False).gallery}


def test_dukev_sorts_unpadded_frame_numbers(tmp_path):
  folder = tmp_path / "DukeV" / "train" / "0007" / "0001"
  for f in (10, 9, 100, 1):
    write_image(str(folder / f"0007_C2_F{f}_X1.jpg"))
  for part in ("query", "gallery"):
    os.makedirs(tmp_path / "DukeV" / part)
  split = dukev.read(str(tmp_path / "DukeV"))
  assert [os.path.basename(f) for f in split.train[0].frames] == [
      f"0007_C2_F{f}_X1.jpg" for f in (1, 9, 10, 100)]


def test_dukev_errors(tmp_path):
  root = write_dukev(str(tmp_path / "DukeV"))
  bad = write_image(os.path.join(root, "train", "0001", "0001", _duke_name(1, 3, 102, False)))
  with pytest.raises(DatasetError, match="disagree") as e:
    dukev.read(root)
  assert os.path.join(root, "train", "0001", "0001") in str(e.value)
  os.remove(bad)
  os.makedirs(os.path.join(root, "gallery", "0002", "0099"))
  with pytest.raises(DatasetError, match="empty tracklet") as e:
    dukev.read(root)
  assert os.path.join(root, "gallery", "0002", "0099") in str(e.value)
  other = tmp_path / "other"
  os.makedirs(other / "train")
  with pytest.raises(DatasetError, match="DukeV folder query/") as e:
    dukev.read(str(other))
  assert os.path.join(str(other), "query") in str(e.value)


# ----------------------------------------------------------------------------- LS-VID

# (pid, cam, frames) per list line; frame numbers are not zero-padded.
LSVID_TRAIN = [(11, 1, [1, 2, 10]), (11, 3, [5]), (12, 2, [3, 4])]
LSVID_TEST = [(20, 1, [1, 2]), (20, 4, [9, 10, 11]), (21, 15, [1]), (-1, 2, [1, 2]),
              (21, 7, [2, 3]), (0, 1, [1])]
LSVID_QUERY = [1, 3]  # 1-based lines of list_seq_test.txt


def write_lsvid(root: str, in_info: bool = False, extra_row: bool = True,
                query=LSVID_QUERY) -> str:
  lists = os.path.join(root, "info", "list_sequence") if in_info else \
      os.path.join(root, "list_sequence")
  os.makedirs(lists, exist_ok=True)
  for part, spec in (("train", LSVID_TRAIN), ("test", LSVID_TEST)):
    lines = []
    for track, (pid, cam, frames) in enumerate(spec):
      folder = f"tracklet_{part}/{max(pid, 0):04d}"
      prefix = f"{folder}/{max(pid, 0):04d}_{track:03d}_{cam:02d}_"
      for f in frames:
        write_image(os.path.join(root, f"{prefix}{f}_0.jpg"))
      lines.append(f"{prefix} {pid}")
    with open(os.path.join(lists, f"list_seq_{part}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  mat = os.path.join(root, "info", "data", "info_test.mat") if in_info else \
      os.path.join(root, "test", "data", "info_test.mat")
  os.makedirs(os.path.dirname(mat), exist_ok=True)
  # MATLAB v7.3 = HDF5 with a 512-byte user block; a MATLAB (N x k) matrix is stored as (k x N),
  # so its first column (the query rows) is row 0 of what h5py returns.
  stored = np.asarray([query, [99] * len(query)] if extra_row else [query], np.float64)
  with h5py.File(mat, "w", userblock_size=512) as f:
    f.create_dataset("query", data=stored)
  with open(mat, "r+b") as f:
    f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")
  return root


@pytest.mark.parametrize("in_info", [False, True])
def test_lsvid(tmp_path, in_info):
  root = write_lsvid(str(tmp_path / "LS-VID"), in_info=in_info)
  split = lsvid.read(root)
  assert _pids_cams(split.train) == sorted(
      ({11: 0, 12: 1}[p], c - 1, len(fr)) for p, c, fr in LSVID_TRAIN)
  t = [t for t in split.train if t.num_frames == 3][0]
  assert [os.path.basename(f) for f in t.frames] == [f"0011_000_01_{f}_0.jpg" for f in (1, 2, 10)]
  assert _pids_cams(split.query) == sorted(
      (LSVID_TEST[i - 1][0], LSVID_TEST[i - 1][1] - 1, len(LSVID_TEST[i - 1][2]))
      for i in LSVID_QUERY)
  assert _pids_cams(split.gallery) == sorted(
      (p, c - 1, len(fr)) for i, (p, c, fr) in enumerate(LSVID_TEST, 1)
      if i not in LSVID_QUERY and p != -1)


def test_lsvid_query_vector_and_errors(tmp_path):
  root = write_lsvid(str(tmp_path / "a"), extra_row=False)
  mat = os.path.join(root, "test", "data", "info_test.mat")
  np.testing.assert_array_equal(lsvid.query_indices(mat), np.asarray(LSVID_QUERY) - 1)
  root = write_lsvid(str(tmp_path / "b"), query=[1, 9])
  with pytest.raises(DatasetError, match="outside 1..6"):
    lsvid.read(root)
  os.remove(os.path.join(root, "test", "data", "info_test.mat"))
  with pytest.raises(DatasetError, match="info_test.mat") as e:
    lsvid.read(root)
  assert os.path.join(root, "test", "data", "info_test.mat") in str(e.value)
  # Two cameras inside one tracklet.
  root = write_lsvid(str(tmp_path / "c"))
  write_image(os.path.join(root, "tracklet_train", "0012", "0012_002_05_7_0.jpg"))
  write_image(os.path.join(root, "tracklet_train", "0012", "0012_002_06_8_0.jpg"))
  with open(os.path.join(root, "list_sequence", "list_seq_train.txt"), "a") as f:
    f.write("tracklet_train/0012/0012_002_ 12\n")
  with pytest.raises(DatasetError, match="disagree on the camera"):
    lsvid.read(root)


# ----------------------------------------------------------------------------- iLIDS-VID

ILIDS_PERSONS = ["person001", "person002", "person005", "person010"]
ILIDS_FRAMES = {"cam1": [317, 9, 10], "cam2": [1, 2]}
ILIDS_SETS = np.asarray([[3, 1, 2, 4], [4, 2, 1, 3]], np.float64)


def write_ilids(root: str) -> str:
  for cam, frames in ILIDS_FRAMES.items():
    for p in ILIDS_PERSONS:
      for f in frames:
        write_image(os.path.join(root, "i-LIDS-VID", "sequences", cam, p, f"{cam}_{p}_{f}.png"))
  splits = os.path.join(root, "train-test people splits")
  os.makedirs(splits)
  scipy.io.savemat(os.path.join(splits, "train_test_splits_ilidsvid.mat"), {"ls_set": ILIDS_SETS})
  return root


@pytest.mark.parametrize("split_id", [0, 1])
def test_ilidsvid(tmp_path, split_id):
  root = write_ilids(str(tmp_path / "ilids-vid"))
  split = ilidsvid.read(root, split_id=split_id)
  row = ILIDS_SETS[split_id].astype(int)
  test = sorted(int(ILIDS_PERSONS[i - 1][6:]) for i in row[:2])
  train = sorted(int(ILIDS_PERSONS[i - 1][6:]) for i in row[2:])
  assert [(t.pid, t.camid) for t in split.query] == [(p, 0) for p in test]
  assert [(t.pid, t.camid) for t in split.gallery] == [(p, 1) for p in test]
  assert sorted((t.pid, t.camid) for t in split.train) == [(i, c) for i in range(2) for c in (0, 1)]
  assert split.num_train_pids == len(train)
  q = split.query[0]
  assert [os.path.basename(f) for f in q.frames] == [
      f"cam1_person{test[0]:03d}_{f}.png" for f in (9, 10, 317)]
  assert split.summary()["queries_without_match"] == 0


def test_ilidsvid_errors(tmp_path):
  root = write_ilids(str(tmp_path / "ilids-vid"))
  with pytest.raises(DatasetError, match="split_id 2"):
    ilidsvid.read(root, split_id=2)
  bad = write_image(os.path.join(root, "i-LIDS-VID", "sequences", "cam1", "person002",
                                 "cam2_person002_11.png"))
  with pytest.raises(DatasetError, match="disagrees") as e:
    ilidsvid.read(root, split_id=0)
  assert bad in str(e.value)
  os.remove(bad)
  empty = os.path.join(root, "i-LIDS-VID", "sequences", "cam2", "person001")
  saved = {n: open(os.path.join(empty, n), "rb").read() for n in os.listdir(empty)}
  for n in saved:
    os.remove(os.path.join(empty, n))
  with pytest.raises(DatasetError, match="empty tracklet") as e:
    ilidsvid.read(root, split_id=0)
  assert empty in str(e.value)
  for n, data in saved.items():
    with open(os.path.join(empty, n), "wb") as f:
      f.write(data)
  ilidsvid.read(root, split_id=0)
  mat = os.path.join(root, "train-test people splits", "train_test_splits_ilidsvid.mat")
  os.remove(mat)
  with pytest.raises(DatasetError, match="train_test_splits_ilidsvid.mat"):
    ilidsvid.read(root)


# ----------------------------------------------------------------------------- PRID2011

# person number -> (frames in cam_a, frames in cam_b); 0201 in each camera is someone else.
PRID = {1: (3, 3), 2: (3, 1), 3: (2, 4), 4: (5, 2), 5: (2, 2), 6: (4, 3), 7: (2, 1), 8: (3, 2)}
PRID_ONLY = {"cam_a": {201: 5}, "cam_b": {201: 4, 202: 3}}


def write_prid(root: str) -> str:
  shot = os.path.join(root, "prid_2011", "multi_shot")
  for p, counts in PRID.items():
    for cam, n in zip(("cam_a", "cam_b"), counts):
      for f in range(n, 0, -1):
        write_image(os.path.join(shot, cam, f"person_{p:04d}", f"{f:04d}.png"))
  for cam, persons in PRID_ONLY.items():
    for p, n in persons.items():
      for f in range(1, n + 1):
        write_image(os.path.join(shot, cam, f"person_{p:04d}", f"{f:04d}.png"))
  return root


def test_prid_missing_split_file_points_to_the_maker(tmp_path):
  root = write_prid(str(tmp_path / "prid2011"))
  with pytest.raises(DatasetError, match="--make-splits") as e:
    prid2011.read(root)
  assert os.path.join(root, "splits_prid2011.json") in str(e.value)


def test_prid_make_splits_and_read(tmp_path):
  root = write_prid(str(tmp_path / "prid2011"))
  path = prid2011.make_splits(root, seed=3, num_splits=4, min_frames=2)
  assert path == os.path.join(root, "splits_prid2011.json")
  splits = json.load(open(path))
  eligible = sorted(f"person_{p:04d}" for p, (a, b) in PRID.items() if min(a, b) >= 2)
  assert len(splits) == 4
  for s in splits:
    assert sorted(s["train"] + s["test"]) == eligible
    assert len(s["test"]) == len(eligible) // 2 and not set(s["train"]) & set(s["test"])
  assert len({tuple(s["test"]) for s in splits}) > 1  # the splits differ
  # Deterministic for a seed, different for another.
  prid2011.make_splits(root, seed=3, num_splits=4, min_frames=2)
  assert json.load(open(path)) == splits
  prid2011.make_splits(root, seed=4, num_splits=4, min_frames=2)
  assert json.load(open(path)) != splits
  prid2011.make_splits(root, seed=3, num_splits=4, min_frames=2)

  split = prid2011.read(root, split_id=2)
  test = [int(d[-4:]) for d in splits[2]["test"]]
  assert [(t.pid, t.camid, t.num_frames) for t in split.query] == [(p, 0, PRID[p][0]) for p in test]
  assert [(t.pid, t.camid, t.num_frames) for t in split.gallery] == [
      (p, 1, PRID[p][1]) for p in test]
  assert split.num_train_pids == len(splits[2]["train"])
  assert [os.path.basename(f) for f in split.query[0].frames] == [
      f"{f:04d}.png" for f in range(1, PRID[test[0]][0] + 1)]
  with pytest.raises(DatasetError, match="split_id 4"):
    prid2011.read(root, split_id=4)


def test_prid_default_min_frames_and_mat_splits(tmp_path):
  root = write_prid(str(tmp_path / "prid2011"))
  assert prid2011.eligible_persons(root, 3) == [
      f"person_{p:04d}" for p, (a, b) in sorted(PRID.items()) if min(a, b) >= 3]
  persons = prid2011.eligible_persons(root, 2)
  ls_set = np.asarray([[2, 5, 1, 3, 4, 6], [6, 1, 3, 2, 5, 4]], np.float64)
  mat = str(tmp_path / "train_test_splits_prid.mat")
  scipy.io.savemat(mat, {"ls_set": ls_set})
  splits = json.load(open(prid2011.splits_from_mat(root, mat, min_frames=2)))
  assert splits[1] == {"train": sorted(persons[i - 1] for i in (2, 5, 4)),
                       "test": sorted(persons[i - 1] for i in (6, 1, 3))}
  scipy.io.savemat(mat, {"ls_set": ls_set[:, :4]})
  with pytest.raises(DatasetError, match=r"expected \(splits, 6\)"):
    prid2011.splits_from_mat(root, mat, min_frames=2)


# ----------------------------------------------------------------------------- registry


def _dataset_config(**fields):
  cfg = default.get_config().dataset
  for k, v in fields.items():
    cfg[k] = v
  return cfg


def test_registry_and_read_from_config(tmp_path):
  assert readers.available() == ["dukev", "ilidsvid", "lsvid", "mars", "prid2011", "synthetic"]
  root = write_mars(str(tmp_path / "MARS"))
  a = readers.read_from_config(_dataset_config(name="mars", root=root, protocol="torchreid"))
  assert a == mars.read(root, protocol="torchreid")
  b = data_pipelines.get_split(_dataset_config(name="mars", root=root, distractors=False))
  assert b == mars.read(root, distractors=False)
  ilids = write_ilids(str(tmp_path / "ilids"))
  c = readers.read_from_config(_dataset_config(name="ilidsvid", root=ilids, split_id=1))
  assert c == ilidsvid.read(ilids, split_id=1)
  with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
    readers.read_dataset("nope", root)
  with pytest.raises(DatasetError, match="root is empty"):
    readers.read_from_config(_dataset_config(name="mars", root=""))


def test_register_rejects_a_second_reader_under_a_name():
  with pytest.raises(ValueError, match="already registered"):
    readers.register("mars")(lambda root: None)


@pytest.mark.parametrize("layout", ["mars", "dukev"])
def test_synthetic_branch_generates_then_reads_the_layout(tmp_path, monkeypatch, layout):
  calls = []

  def ensure_generated(root, knobs):
    calls.append((root, dict(knobs)))
    folder = os.path.join(root, "generated")
    if not os.path.isdir(folder):
      (write_mars if knobs["layout"] == "mars" else write_dukev)(folder)
    return folder

  fake = types.ModuleType("data_pipelines.synthetic")
  fake.ensure_generated = ensure_generated
  monkeypatch.setattr(readers, "synthetic", fake)  # the generator the readers call
  cfg = _dataset_config(name="synthetic", root=str(tmp_path), protocol="torchreid")
  cfg.synthetic.layout = layout
  cfg.synthetic.num_ids = 5
  split = readers.read_from_config(cfg)
  assert calls == [(str(tmp_path), {"layout": layout, "num_ids": 5})]
  reader = mars.read if layout == "mars" else dukev.read
  direct = reader(os.path.join(str(tmp_path), "generated"), protocol="torchreid")
  assert split.name == "synthetic"
  assert (split.train, split.query, split.gallery) == (direct.train, direct.query, direct.gallery)
  cfg.synthetic.layout = "market"
  with pytest.raises(DatasetError, match="layout is 'market'"):
    readers.read_from_config(cfg)


def test_split_summary_counts_match_direct_computation(tmp_path):
  split = mars.read(write_mars(str(tmp_path / "MARS")))
  s = split.summary()["splits"]["train"]
  assert s == {"ids": len({p for p, _, _ in MARS_TRAIN}), "tracklets": len(MARS_TRAIN),
               "frames": sum(len(f) for _, _, f in MARS_TRAIN),
               "cameras": len({c for _, c, _ in MARS_TRAIN})}
  assert isinstance(split.train[0], tl.Tracklet)
