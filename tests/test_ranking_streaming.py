"""`ranking.rank_streaming` / `rank_distance_blocks` (gallery streamed in chunks) against the
in-memory `rank`, the per-query NumPy loop and a brute-force top-k."""

import json

import numpy as np
import pytest

from benchmarks import ranking as ranking_benchmark
from stmn_jax import ranking, sharding

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_Q, NUM_G, DIM = 24, 201, 5  # 201 = 5 x 40 + 1: chunks of 40 leave a last chunk of 1 row


def ids(rng, num_q=NUM_Q, num_g=NUM_G):
  """pids / cameras with junk (-1), pid-0 distractors, same-camera items, queries whose pid is
  not in the gallery and a junk query."""
  q_pids = rng.integers(1, 9, num_q)
  q_pids[:2] = [9, -1]  # pid 9 is never in the gallery; -1 is a junk query
  g_pids = rng.integers(-1, 8, num_g)  # -1 junk, 0 distractors, 1..7 identities
  return q_pids, g_pids, rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)


def assert_identical(a, b):
  """Bit-for-bit equal metrics."""
  np.testing.assert_array_equal(a["cmc"], b["cmc"])
  assert a["mAP"] == b["mAP"] and a["mINP"] == b["mINP"]
  assert a["num_valid_queries"] == b["num_valid_queries"]
  assert a["num_queries_without_match"] == b["num_queries_without_match"]


def brute_topk(distmat, q_pids, g_pids, q_cams, g_cams, k):
  """Each query's k nearest ranked items by a stable argsort (-1 / inf when fewer)."""
  idx = np.full((len(q_pids), k), -1)
  dist = np.full((len(q_pids), k), np.inf, np.float32)
  for i, row in enumerate(distmat):
    ranked = (g_pids != -1) & ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
    order = np.flatnonzero(ranked)[np.argsort(row[ranked], kind="stable")][:k]
    idx[i, :order.size], dist[i, :order.size] = order, row[order]
  return idx, dist


def uneven_blocks(distmat, g_pids, g_cams, cuts):
  return [(distmat[:, a:b], g_pids[a:b], g_cams[a:b]) for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("ap", ["noninterp", "matlab"])
def test_distance_blocks_equal_rank_bit_for_bit(ap):
  rng = np.random.default_rng(0)
  q_pids, g_pids, q_cams, g_cams = ids(rng)
  distmat = rng.integers(0, 6, (NUM_Q, NUM_G)).astype(np.float32)  # many exact ties
  distmat[3, :7] = [-np.inf, np.inf, np.inf, -0.0, 0.0, -np.inf, 0.0]  # +-inf and signed zeros
  args = (distmat, q_pids, g_pids, q_cams, g_cams)
  ref = ranking.rank(*args, max_rank=15, ap=ap)
  loop = ranking.rank_reference(*args, max_rank=15, ap=ap)
  assert ref["num_queries_without_match"] >= 2 and 0 < ref["mAP"] < 1
  np.testing.assert_allclose(ref["cmc"], loop["cmc"], atol=1e-12)
  assert ref["mAP"] == pytest.approx(loop["mAP"], abs=1e-12)
  sources = [
      ((distmat, g_pids, g_cams), 40),  # arrays; last chunk of 1 row
      ((distmat, g_pids, g_cams), None),
      (uneven_blocks(distmat, g_pids, g_cams, [0, 3, 4, 90, 91, 200, 201]), 16),  # re-cut
      (lambda: iter(uneven_blocks(distmat, g_pids, g_cams, [0, 100, 201])), 64),  # callable
  ]
  for source, chunk in sources:
    got = ranking.rank_distance_blocks(
        source, q_pids, q_cams, max_rank=15, ap=ap, gallery_chunk=chunk)
    assert_identical(got, ref)
    assert got["num_gallery"] == NUM_G


def test_features_equal_in_memory_rank_and_devices_agree():
  """Small-integer features: every dot product is exact in float32, so the streamed and the
  in-memory distances are equal and ties are exact and many; 1 and 4 devices agree."""
  rng = np.random.default_rng(1)
  q_pids, g_pids, q_cams, g_cams = ids(rng)
  q = rng.integers(-1, 2, (NUM_Q, DIM)).astype(np.float32)
  g = rng.integers(-1, 2, (NUM_G, DIM)).astype(np.float32)
  one, four = sharding.make_mesh(1), sharding.make_mesh(4)
  for metric, configs in (("sqeuclidean", ((one, 40), (four, 40))), ("euclidean", ((four, 52),))):
    distmat = ranking.pairwise_distance(q, g, metric)
    ref = ranking.rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert np.mean([r.size - np.unique(r).size for r in distmat]) > NUM_G / 2  # ties
    runs = [
        ranking.rank_streaming(q, q_pids, q_cams, (g, g_pids, g_cams), metric=metric,
                                  max_rank=10, gallery_chunk=chunk, topk=6, mesh=mesh)
        for mesh, chunk in configs
    ]
    want_idx, want_dist = brute_topk(distmat, q_pids, g_pids, q_cams, g_cams, 6)
    for got in runs:
      assert_identical(got, ref)
      np.testing.assert_array_equal(got["topk_index"], want_idx)
      np.testing.assert_array_equal(got["topk_distance"], want_dist)


def test_topk_edges_and_cmc_agree_with_topk():
  """Fewer ranked items than k (-1 / inf), +inf distances ranked before nothing, and the first
  true match's position (CMC, from the counts) agrees with where the top-k shows it."""
  rng = np.random.default_rng(2)
  num_g = 30
  q_pids, g_pids, q_cams, g_cams = ids(rng, num_g=num_g)
  g_pids[:20] = -1  # only 10 items left to rank, fewer for queries with same-camera items
  g_pids[20:] = np.arange(10) % 4 + 1
  distmat = rng.integers(0, 3, (NUM_Q, num_g)).astype(np.float32)
  distmat[:, 25:] = np.inf
  k = 12
  got = ranking.rank_distance_blocks((distmat, g_pids, g_cams), q_pids, q_cams, max_rank=k,
                                        gallery_chunk=8, topk=k)
  want_idx, want_dist = brute_topk(distmat, q_pids, g_pids, q_cams, g_cams, k)
  assert (want_idx == -1).any() and np.isinf(want_dist[want_idx >= 0]).any()
  np.testing.assert_array_equal(got["topk_index"], want_idx)
  np.testing.assert_array_equal(got["topk_distance"], want_dist)
  assert_identical(got, ranking.rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=k))
  # CMC@j from the top-k lists: a true match (same pid, other camera) among the first j.
  valid = [i for i in range(NUM_Q)
           if ((g_pids == q_pids[i]) & (g_cams != q_cams[i]) & (q_pids[i] != -1)).any()]
  hit = np.array([[(lambda j: j >= 0 and g_pids[j] == q_pids[i] and g_cams[j] != q_cams[i])(j)
                   for j in got["topk_index"][i]] for i in valid])
  np.testing.assert_allclose(np.cumsum(hit, axis=1).clip(0, 1).mean(axis=0), got["cmc"])


def test_real_features_against_the_numpy_loop(tmp_path):
  """Gaussian features, cosine: against `rank_reference` on float64 distances. Only float
  rounding can differ, and the case has no near-tie that rounding could flip (checked), so the
  metrics agree to 1e-12. The gallery is also read from a memory-mapped .npy."""
  rng = np.random.default_rng(3)
  q_pids, g_pids, q_cams, g_cams = ids(rng)
  q = rng.standard_normal((NUM_Q, 16)).astype(np.float32)
  g = rng.standard_normal((NUM_G, 16)).astype(np.float32)
  qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
  gn = g.astype(np.float64) / np.linalg.norm(g, axis=1, keepdims=True)
  exact = 1.0 - qn @ gn.T
  # The metrics only see the order of true matches against the other ranked items: no such
  # pair is closer than 5e-6, far above float32's error on these 16-d cosines (~1e-6).
  gaps = []
  for i in range(NUM_Q):
    ranked = (g_pids != -1) & ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
    match = ranked & (g_pids == q_pids[i])
    gaps.append(np.abs(exact[i, match][:, None] - exact[i, ranked & ~match][None]).min(
        initial=np.inf))
  assert min(gaps) > 5e-6
  np.save(tmp_path / "g.npy", g)
  mapped = np.load(tmp_path / "g.npy", mmap_mode="r", allow_pickle=False)
  for ap in ("noninterp", "matlab"):
    want = ranking.rank_reference(exact, q_pids, g_pids, q_cams, g_cams, max_rank=10, ap=ap)
    for gallery in ((g, g_pids, g_cams), (mapped, g_pids, g_cams)):
      got = ranking.rank_streaming(q, q_pids, q_cams, gallery, max_rank=10, ap=ap,
                                      gallery_chunk=40)
      np.testing.assert_allclose(got["cmc"], want["cmc"], rtol=0, atol=1e-12)
      assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-12)
      assert got["mINP"] == pytest.approx(want["mINP"], abs=1e-12)
      assert got["num_valid_queries"] == want["num_valid_queries"]


def test_bad_input_is_named():
  rng = np.random.default_rng(4)
  q_pids, g_pids, q_cams, g_cams = ids(rng)
  q = rng.standard_normal((NUM_Q, DIM)).astype(np.float32)
  g = rng.standard_normal((NUM_G, DIM)).astype(np.float32)
  run = lambda *a, **kw: ranking.rank_streaming(*a, gallery_chunk=40, **kw)
  with pytest.raises(ValueError, match=r"gallery chunk 0 .*feature dim D = 5"):
    run(q, q_pids, q_cams, (g[:, :4], g_pids, g_cams))
  with pytest.raises(ValueError, match=r"q_camids: expected shape \(24,\)"):
    run(q, q_pids, q_cams[:-1], (g, g_pids, g_cams))
  with pytest.raises(ValueError, match=r"chunk 2 .*pids: expected integer ids, got dtype float"):
    run(q, q_pids, q_cams, [(g[:80], g_pids[:80], g_cams[:80])] * 2
        + [(g[:80], g_pids[:80].astype(float), g_cams[:80])])
  bad = g.copy()
  bad[[77, 150]] = np.nan
  with pytest.raises(ValueError, match=r"non-finite .* gallery row\(s\) \[77\]"):
    run(q, q_pids, q_cams, (bad, g_pids, g_cams))
  with pytest.raises(ValueError, match=r"query_feats: non-finite values in 1 row\(s\), first: \[3"):
    run(np.where(np.arange(NUM_Q)[:, None] == 3, np.inf, q), q_pids, q_cams, (g, g_pids, g_cams))
  with pytest.raises(ValueError, match="one-shot iterator"):
    run(q, q_pids, q_cams, (c for c in [(g, g_pids, g_cams)]))
  calls = []

  def changing():
    calls.append(1)
    return iter([(g, g_pids if len(calls) == 1 else g_pids[::-1].copy(), g_cams)])
  with pytest.raises(ValueError, match="gallery changed between passes"):
    run(q, q_pids, q_cams, changing)
  with pytest.raises(ValueError, match="none of the 24 queries has a true match"):
    run(q, np.full(NUM_Q, 99), q_cams, (g, g_pids, g_cams))
  with pytest.raises(ValueError, match="ap = 'x'"):
    run(q, q_pids, q_cams, (g, g_pids, g_cams), ap="x")
  distmat = np.zeros((NUM_Q, NUM_G), np.float32)
  distmat[5, 199] = np.nan
  with pytest.raises(ValueError, match=r"distance blocks: NaN distances at gallery row\(s\) \[199"):
    ranking.rank_distance_blocks((distmat, g_pids, g_cams), q_pids, q_cams, gallery_chunk=40)


def write_extracted(path, feats, pids, cams):
  np.save(path, feats)
  with open(str(path)[:-4] + ".csv", "w") as f:
    f.write("tracklet,pid,camera,num_frames,first_frame\n")
    f.writelines(f"{i},{p},{c},4,f{i}.jpg\n" for i, (p, c) in enumerate(zip(pids, cams)))


def test_cli_streams_and_prints_the_same(tmp_path, capsys):
  rng = np.random.default_rng(5)
  q_pids, g_pids, q_cams, g_cams = ids(rng)
  write_extracted(tmp_path / "q.npy", rng.integers(-1, 2, (NUM_Q, DIM)).astype(np.float32),
                  q_pids, q_cams)
  write_extracted(tmp_path / "g.npy", rng.integers(-1, 2, (NUM_G, DIM)).astype(np.float32),
                  g_pids, g_cams)
  base = [f"--query={tmp_path / 'q.npy'}", f"--gallery={tmp_path / 'g.npy'}",
          "--distance=euclidean", "--json"]
  outs = []
  for extra in ([], ["--stream", "--gallery_chunk=40"], ["--stream_above=100"]):
    assert ranking.cli.main(base + extra) == 0
    outs.append(json.loads(capsys.readouterr().out))
  assert "streamed" not in outs[0] and outs[1]["streamed"] and outs[2]["streamed"]
  for out in outs[1:]:
    for key in ("cmc", "mAP", "mINP", "R1", "R5", "num_valid_queries"):
      assert out[key] == outs[0][key]
  assert ranking.cli.main(base + ["--stream", "--rerank"]) == 2
  assert "--rerank" in capsys.readouterr().err


def test_tiny_scaling_run_output():
  out = ranking_benchmark.scaling([1000, 2000], [8], num_q=20, chunk=256, topk=3, isolate=False)
  assert [(r["dim"], r["gallery"], r["num_gallery"]) for r in out["scaling"]] == [
      (8, 1000, 1000), (8, 2000, 2000)]
  for r in out["scaling"]:
    assert r["num_valid_queries"] == 20 and r["wall_s"] > 0 and r["distance_gflops"] > 0
  check = out["checks"][0]
  assert check["sizes"] == [1000, 2000] and check["size_ratio"] == 2
  assert check["time_ratio"] == round(out["scaling"][1]["wall_s"] / out["scaling"][0]["wall_s"], 2)
  assert isinstance(check["linear"], bool) and isinstance(check["flat_memory"], bool)
