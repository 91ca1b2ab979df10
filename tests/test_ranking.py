"""`ranking.rank` (vectorised, JAX) against the per-query NumPy loop and hand examples."""

import numpy as np
import pytest

from stmn_jax import ranking


def random_case(rng, num_q, num_g, num_ids=8, num_cams=3, levels=5):
  """Integer-valued distances (many exact ties), junk pid -1, same-camera matches, queries
  whose pid is absent from the gallery."""
  distmat = rng.integers(0, levels, (num_q, num_g)).astype(np.float32)
  q_pids = rng.integers(0, num_ids + 2, num_q)  # ids num_ids, num_ids+1: never in the gallery
  q_pids[0] = -1  # a junk query: never valid
  g_pids = rng.integers(-1, num_ids, num_g)
  q_cams = rng.integers(0, num_cams, num_q)
  g_cams = rng.integers(0, num_cams, num_g)
  return distmat, q_pids, g_pids, q_cams, g_cams


def assert_same(a, b):
  np.testing.assert_allclose(a["cmc"], b["cmc"], rtol=0, atol=1e-12)
  assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
  assert a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)
  assert a["num_valid_queries"] == b["num_valid_queries"]
  assert a["num_queries_without_match"] == b["num_queries_without_match"]


@pytest.mark.parametrize("ap", ["noninterp", "matlab"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_matches_reference_loop(seed, ap):
  rng = np.random.default_rng(seed)
  case = random_case(rng, num_q=40, num_g=150)
  ref = ranking.rank_reference(*case, max_rank=12, ap=ap)
  assert ref["num_queries_without_match"] > 0  # the case exercises skipped queries
  for chunk_size in (1, 16, 48, 2048):
    assert_same(ranking.rank(*case, max_rank=12, ap=ap, chunk_size=chunk_size), ref)


def test_rank_reference_is_a_stable_argsort_loop():
  """The reference itself against a direct reading of the protocol on one query."""
  rng = np.random.default_rng(5)
  distmat, q_pids, g_pids, q_cams, g_cams = random_case(rng, 1, 60, num_ids=3)
  q_pids[:] = 1
  keep = [g for g in sorted(range(60), key=lambda g: (distmat[0, g], g))
          if g_pids[g] != -1 and not (g_pids[g] == 1 and g_cams[g] == q_cams[0])]
  hits = [i for i, g in enumerate(keep) if g_pids[g] == 1]
  ap = np.mean([(k + 1) / (r + 1) for k, r in enumerate(hits)])
  res = ranking.rank_reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=5)
  assert res["mAP"] == pytest.approx(ap)
  assert res["mINP"] == pytest.approx(len(hits) / (hits[-1] + 1))
  np.testing.assert_array_equal(res["cmc"], [float(hits[0] <= j) for j in range(5)])


def test_rank_float_ties_and_large_gallery_ids():
  """Real-valued distances with a few exact float32 ties, non-contiguous pids and camids."""
  rng = np.random.default_rng(3)
  distmat = rng.random((30, 400)).astype(np.float32)
  distmat[:, 100:140] = distmat[:, 60:100]  # exact ties at different gallery positions
  q_pids = rng.choice([7, 1000, 123456], 30)
  g_pids = rng.choice([-1, 7, 1000, 123456, 5], 400)
  q_cams, g_cams = rng.integers(10, 13, 30), rng.integers(10, 13, 400)
  args = (distmat, q_pids, g_pids, q_cams, g_cams)
  for ap in ("noninterp", "matlab"):
    assert_same(ranking.rank(*args, max_rank=50, ap=ap), ranking.rank_reference(
        *args, max_rank=50, ap=ap))


def test_rank_infinite_distances():
  rng = np.random.default_rng(4)
  case = list(random_case(rng, 20, 80))
  case[0][rng.random(case[0].shape) < 0.2] = np.inf
  case[0][rng.random(case[0].shape) < 0.1] = -np.inf
  assert_same(ranking.rank(*case), ranking.rank_reference(*case))


def test_hand_example_known_values():
  """Query 0 (pid 1, cam 0): after removing junk and pid 1 / cam 0, the list is
  [neg 0.1, hit 0.5, neg 0.7, hit 0.9] -> hits at 0-based positions 1 and 3.
  Query 1 has no true match (its pid 9 is absent)."""
  distmat = np.array([
      [0.5, 0.1, 0.05, 0.01, 0.9, 0.7],
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
  ], np.float32)
  g_pids = np.array([1, 2, 1, -1, 1, 3])
  g_cams = np.array([1, 1, 0, 1, 2, 0])
  q_pids, q_cams = np.array([1, 9]), np.array([0, 0])
  args = (distmat, q_pids, g_pids, q_cams, g_cams)
  res = ranking.rank(*args, max_rank=4)
  np.testing.assert_allclose(res["cmc"], [0.0, 1.0, 1.0, 1.0])
  assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
  assert res["mINP"] == pytest.approx(2 / 4)
  assert (res["num_valid_queries"], res["num_queries_without_match"]) == (1, 1)
  # MATLAB trapezoid: (0 + 1/2)/2 * 1/2 + (1/3 + 2/4)/2 * 1/2 = 1/3.
  assert ranking.rank(*args, ap="matlab")["mAP"] == pytest.approx(1 / 3)


def test_ties_break_by_gallery_order():
  """All distances equal: the order is the gallery order, so moving a hit earlier helps."""
  distmat = np.ones((1, 4), np.float32)
  q_pids, q_cams = np.array([1]), np.array([0])
  g_cams = np.array([1, 1, 1, 1])
  late = ranking.rank(distmat, q_pids, np.array([2, 1, 1, 2]), q_cams, g_cams, max_rank=2)
  assert late["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  np.testing.assert_allclose(late["cmc"], [0.0, 1.0])
  assert late["mINP"] == pytest.approx(2 / 3)
  early = ranking.rank(distmat, q_pids, np.array([1, 2, 2, 1]), q_cams, g_cams, max_rank=2)
  assert early["mAP"] == pytest.approx((1 + 2 / 4) / 2)
  np.testing.assert_allclose(early["cmc"], [1.0, 1.0])


def test_max_rank_beyond_gallery_saturates():
  distmat = np.array([[0.3, 0.1, 0.2]], np.float32)
  res = ranking.rank(distmat, [1], [2, 2, 1], [0], [1, 1, 1], max_rank=5)
  np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1, 1])  # hit at 0-based position 1


def test_rank_errors():
  distmat = np.zeros((2, 3), np.float32)
  ok = ([1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
  with pytest.raises(ValueError, match="g_pids"):
    ranking.rank(distmat, [1, 2], [1, 2], [0, 0], [1, 1, 1])
  with pytest.raises(ValueError, match="ap"):
    ranking.rank(distmat, *ok, ap="interp")
  with pytest.raises(ValueError, match="no|none"):
    ranking.rank(distmat, [5, 6], [1, 2, 3], [0, 0], [1, 1, 1])
  bad = distmat.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match=r"NaN.*\[1\]"):
    ranking.rank(bad, *ok)
  with pytest.raises(ValueError, match="integer"):
    ranking.rank(distmat, [1.5, 2.0], [1, 2, 3], [0, 0], [1, 1, 1])


def test_rank_accepts_a_sharded_jax_distmat():
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(6)
  distmat, *ids = random_case(rng, 24, 60)
  mesh = jax.make_mesh((4,), ("data",))
  sharded = jax.device_put(distmat, NamedSharding(mesh, P("data")))
  assert_same(ranking.rank(sharded, *ids, chunk_size=32), ranking.rank_reference(
      distmat, *ids))
