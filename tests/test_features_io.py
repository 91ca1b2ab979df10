"""`features_io`: the `.npy` + `.csv` files of --mode=extract, written, read and refused."""

import os
import types

import numpy as np
import pytest

from stmn_jax import features_io

HEADER = "tracklet,pid,camera,num_frames,first_frame"


def tracklets(n):
  return [types.SimpleNamespace(pid=10 + i, camid=i % 3, num_frames=5 + i,
                                frames=[f"/data/t{i}/0001.jpg", f"/data/t{i}/0002.jpg"])
          for i in range(n)]


@pytest.fixture
def written(tmp_path):
  """A valid pair of files of 3 embeddings; returns (npy path, feats)."""
  feats = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  npy = str(tmp_path / "features" / "query.npy")
  features_io.write_features(npy, feats, ["a/1", "a/2", "b/1"], tracklets(3))
  return npy, feats


def write_csv(npy, lines):
  with open(features_io.index_path(npy), "w") as f:
    f.write("\n".join(lines) + "\n")


def test_round_trip(tmp_path):
  feats = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
  npy = str(tmp_path / "new" / "folder" / "query.npy")  # the folder is created
  out = features_io.write_features(npy, feats, ["a/1", "a/2", "b/1"], tracklets(3))
  assert out == (npy, str(tmp_path / "new" / "folder" / "query.csv"))
  with open(out[1]) as f:
    assert f.readline().strip() == HEADER
  got, rows = features_io.read_features(npy)
  assert got.dtype == np.float32 and not isinstance(got, np.memmap)
  np.testing.assert_array_equal(got, feats)
  assert rows == [{"tracklet": name, "pid": 10 + i, "camera": i % 3, "num_frames": 5 + i,
                   "first_frame": f"/data/t{i}/0001.jpg"}
                  for i, name in enumerate(["a/1", "a/2", "b/1"])]
  mapped, _ = features_io.read_features(npy, mmap=True)
  assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
  np.testing.assert_array_equal(mapped, feats)
  f, pids, camids = features_io.read_arrays(npy, mmap=True)
  np.testing.assert_array_equal(f, feats)
  assert pids.dtype == camids.dtype == np.int64
  assert pids.tolist() == [10, 11, 12] and camids.tolist() == [0, 1, 2]


def test_float64_is_read_as_float32(tmp_path):
  npy = str(tmp_path / "x.npy")
  features_io.write_features(npy, np.ones((2, 3)), ["a", "b"], tracklets(2))
  assert features_io.read_features(npy)[0].dtype == np.float32


def test_missing_files(written, tmp_path):
  npy, _ = written
  absent = str(tmp_path / "absent.npy")
  for error in (FileNotFoundError, ValueError):  # what retrieval / the ranking CLI catch
    with pytest.raises(error, match=r"absent\.npy: no such file"):
      features_io.read_features(absent)
  os.remove(features_io.index_path(npy))
  with pytest.raises(FileNotFoundError, match=r"query\.csv: missing index CSV .*query\.npy"):
    features_io.read_features(npy)


def test_refused_arrays(tmp_path):
  npy = str(tmp_path / "bad.npy")
  write_csv(npy, [HEADER, "a,1,0,3,f.jpg"])
  np.save(npy, np.array([{"x": 1}], dtype=object))
  for mmap in (False, True):
    with pytest.raises(ValueError, match=r"bad\.npy: cannot read .*allow_pickle=False"):
      features_io.read_features(npy, mmap=mmap)
  np.save(npy, np.ones(4, np.float32))
  with pytest.raises(ValueError, match=r"bad\.npy: expected a 2-d float \(T, D\) array, got "
                                       r"float32 \(4,\)"):
    features_io.read_features(npy)
  np.save(npy, np.ones((1, 4), np.int64))
  with pytest.raises(ValueError, match=r"bad\.npy: expected a 2-d float .* int64"):
    features_io.read_features(npy)
  with open(npy, "wb") as f:
    f.write(b"not an array")
  with pytest.raises(ValueError, match=r"bad\.npy: cannot read"):
    features_io.read_features(npy)


@pytest.mark.parametrize("lines,message", [
    (["tracklet,pid,camera", "a,1,0", "b,2,1", "c,3,2"],
     r"query\.csv: expected the header tracklet,pid,camera,num_frames,first_frame; got "
     r"tracklet,pid,camera"),
    ([], r"query\.csv: expected the header .*; got an empty file"),
    ([HEADER, "a,1,0,3,f.jpg", "b,x,1,3,f.jpg", "c,3,2,3,f.jpg"],
     r"query\.csv line 3: pid, camera and num_frames must be integers"),
    ([HEADER, "a,1,0,3,f.jpg", "b,2,1,3,f.jpg", "c,3,2,2.5,f.jpg"],
     r"query\.csv line 4: pid, camera and num_frames must be integers"),
    ([HEADER, "a,1,0,3,f.jpg", "b,2,1"], r"query\.csv line 3: expected a value for each"),
    ([HEADER, "a,1,0,3,f.jpg", "b,2,1,3,f.jpg"],
     r"query\.csv: 2 rows but .*query\.npy has 3 embeddings"),
])
def test_refused_index(written, lines, message):
  npy, _ = written
  write_csv(npy, lines)
  with pytest.raises(ValueError, match=message):
    features_io.read_features(npy)


def test_write_refuses_what_read_would_refuse(tmp_path):
  npy = str(tmp_path / "x.npy")
  with pytest.raises(ValueError, match=r"x\.npy: 2 embeddings but 1 names and 2 tracklets"):
    features_io.write_features(npy, np.ones((2, 3), np.float32), ["a"], tracklets(2))
  with pytest.raises(ValueError, match=r"x\.npy: expected \(T, D\) float"):
    features_io.write_features(npy, np.ones(3, np.float32), ["a"], tracklets(1))
  with pytest.raises(ValueError, match=r"ending in \.npy"):
    features_io.write_features(str(tmp_path / "x"), np.ones((1, 3)), ["a"], tracklets(1))
  assert not os.listdir(tmp_path)
