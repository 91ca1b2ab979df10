"""The tracklet index: counts, unmatched queries, relabelling, arrays, validation hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import tracklets as tl


def T(pid: int, camid: int, n: int = 2, tag: str = "") -> tl.Tracklet:
  return tl.Tracklet(frames=tuple(f"{pid}/{camid}/{tag}{i}.jpg" for i in range(n)), pid=pid,
                     camid=camid)


def test_empty_tracklet_is_an_error():
  with pytest.raises(ValueError, match="empty tracklet"):
    tl.Tracklet(frames=(), pid=3, camid=0)


def test_counts_relabel_arrays():
  ts = [T(7, 0, 3), T(7, 2, 1), T(2, 1, 4), T(40, 0, 2)]
  assert tl.split_counts(ts) == {"ids": 3, "tracklets": 4, "frames": 10, "cameras": 3}
  rel = tl.relabel(ts)
  assert [t.pid for t in rel] == [1, 1, 0, 2]  # increasing order of the raw pid
  assert [t.frames for t in rel] == [t.frames for t in ts]
  a = tl.arrays(ts)
  np.testing.assert_array_equal(a["pid"], [7, 7, 2, 40])
  np.testing.assert_array_equal(a["camid"], [0, 2, 1, 0])
  np.testing.assert_array_equal(a["num_frames"], [3, 1, 4, 2])
  assert a["pid"].dtype == np.int32


def test_queries_without_match():
  query = [T(1, 0), T(2, 0), T(3, 1), T(4, 0)]
  gallery = [T(1, 0), T(1, 1), T(2, 0), T(3, 0), T(-1, 1), T(4, 0, tag="x")]
  # 1: cam 1 match; 2: same camera only; 3: cam 0 match; 4: same camera only.
  assert tl.queries_without_match(query, gallery) == 2
  assert tl.queries_without_match([T(-1, 0)], [T(-1, 1)]) == 1  # junk never matches


def _train_split(num_ids: int = 20) -> tl.Split:
  """pid p has tracklets in cameras 0..(p % 3) (so pids with p % 3 == 0 have one camera)."""
  train = [T(p, c, 1 + (p + c) % 3) for p in range(num_ids) for c in range(p % 3 + 1)]
  train += [T(p, 0, 1, tag="extra") for p in range(0, num_ids, 4)]  # second cam-0 tracklets
  return tl.Split(name="toy", train=tuple(train), query=(T(100, 0),), gallery=(T(100, 1),))


def test_holdout_validation_structure():
  split = _train_split()
  train, val = tl.holdout_validation(split, num_val_ids=6, num_val_queries=5, seed=0)
  val_ids = {t.pid for t in val.gallery}
  assert len(val_ids) == 6
  # Gallery = every held-out tracklet, in the original order.
  assert val.gallery == tuple(t for t in split.train if t.pid in val_ids)
  assert val.name == "toy-val" and val.train == ()
  # Queries are held-out tracklets, counted exactly.
  assert len(val.query) == 5 and set(val.query) <= set(val.gallery)
  # The remaining identities, relabelled 0..C'-1, frames untouched.
  rest = [t for t in split.train if t.pid not in val_ids]
  assert train.train == tl.relabel(rest)
  assert sorted({t.pid for t in train.train}) == list(range(20 - 6))
  assert (train.query, train.gallery, train.name) == (split.query, split.gallery, split.name)


def test_holdout_validation_prefers_queries_with_a_cross_camera_match():
  split = _train_split()
  for seed in range(5):
    _, val = tl.holdout_validation(split, num_val_ids=8, num_val_queries=6, seed=seed)
    cams = {}
    for t in val.gallery:
      cams.setdefault(t.pid, set()).add(t.camid)
    matched = [t for t in val.gallery if cams[t.pid] - {t.camid}]
    expected_unmatched = max(0, 6 - len(matched))
    assert tl.queries_without_match(val.query, val.gallery) == expected_unmatched


def test_holdout_validation_caps_queries_and_fills_with_unmatched():
  split = _train_split()
  _, val = tl.holdout_validation(split, num_val_ids=10, num_val_queries=1000, seed=1)
  assert val.query == val.gallery  # every held-out tracklet, in order


def test_holdout_validation_is_deterministic_for_a_seed():
  split = _train_split()
  a = tl.holdout_validation(split, 6, 5, seed=7)
  b = tl.holdout_validation(split, 6, 5, seed=7)
  c = tl.holdout_validation(split, 6, 5, seed=8)
  assert a == b
  assert {t.pid for t in a[1].gallery} != {t.pid for t in c[1].gallery} or a[1].query != c[1].query


def test_holdout_validation_errors():
  split = _train_split(4)
  with pytest.raises(ValueError, match="num_val_ids=4"):
    tl.holdout_validation(split, 4, 5, 0)
  with pytest.raises(ValueError, match="num_val_ids=0"):
    tl.holdout_validation(split, 0, 5, 0)
  with pytest.raises(ValueError, match="num_val_queries=0"):
    tl.holdout_validation(split, 2, 0, 0)
