"""Ranking benchmark at MARS size: `stmn_jax.evaluation.rank` vs the per-query NumPy loop.

    python -m benchmarks.ranking [--queries=1980 --gallery=11310 --dim=2048 --repeats=5]
                                 [--ap=noninterp|matlab --junk=0 --chunk_size=2048]

Synthetic features with MARS-like structure (official protocol): 634 identities plus a pid-0
distractor group (3,248 tracklets) in the gallery over 6 cameras, ~12.7 tracklets per identity,
every query also in the gallery (so 4-20 true matches per query). Distances: cosine, float32.
Checks that both rankings give identical results, prints both times (JAX compile apart), the
speed-up and peak memory, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import tracemalloc

import numpy as np


def make_structure(num_q: int, num_g: int, num_ids: int, distractors: int, num_cams: int,
                   junk: int, seed: int):
  """pid / camid arrays and per-tracklet identity for a MARS-like official-protocol split."""
  rng = np.random.default_rng(seed)
  n_real = num_g - distractors - junk
  # Identities 1..num_ids, each with 4..21 tracklets (mean ~ n_real / num_ids), random cameras.
  sizes = rng.multinomial(n_real - 4 * num_ids, np.full(num_ids, 1.0 / num_ids)) + 4
  g_pids = np.concatenate([
      np.repeat(np.arange(1, num_ids + 1), sizes), np.zeros(distractors, np.int64),
      np.full(junk, -1, np.int64),
  ])
  g_cams = rng.integers(0, num_cams, num_g)
  perm = rng.permutation(num_g)
  g_pids, g_cams = g_pids[perm], g_cams[perm]
  # Queries are gallery tracklets of real identities (the official MARS gallery holds them).
  real = np.flatnonzero(g_pids > 0)
  q_from_g = rng.choice(real, size=num_q, replace=False)
  return g_pids[q_from_g], g_pids, g_cams[q_from_g], g_cams, q_from_g


def make_features(g_pids: np.ndarray, q_from_g: np.ndarray, dim: int, seed: int):
  """Identity centre + noise, so that the ranking is neither trivial nor random."""
  rng = np.random.default_rng(seed + 1)
  centres = rng.standard_normal((int(g_pids.max()) + 2, dim)).astype(np.float32)
  g = rng.standard_normal((g_pids.size, dim)).astype(np.float32)
  g += np.where(g_pids[:, None] > 0, 0.3 * centres[np.maximum(g_pids, 0)], 0.0)
  return g[q_from_g], g


class PeakRSS:
  """Peak resident set size (bytes) above the level at entry, sampled every 5 ms."""

  def __enter__(self):
    self.base = self.peak = self._rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._rss())

  @property
  def growth(self) -> int:
    return self.peak - self.base

  @staticmethod
  def _rss() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  def _watch(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, self._rss())


def same_results(a: dict, b: dict) -> bool:
  return (
      np.abs(a["cmc"] - b["cmc"]).max() < 1e-12 and abs(a["mAP"] - b["mAP"]) < 1e-12
      and abs(a["mINP"] - b["mINP"]) < 1e-12
      and a["num_valid_queries"] == b["num_valid_queries"]
  )


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.ranking")
  p.add_argument("--queries", type=int, default=1980)
  p.add_argument("--gallery", type=int, default=11310)
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--ids", type=int, default=634)
  p.add_argument("--distractors", type=int, default=3248)
  p.add_argument("--junk", type=int, default=0, help="pid -1 gallery items")
  p.add_argument("--cams", type=int, default=6)
  p.add_argument("--ap", default="noninterp", choices=("noninterp", "matlab"))
  p.add_argument("--chunk_size", type=int, default=2048)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  from stmn_jax import evaluation  # pylint: disable=g-import-not-at-top

  q_pids, g_pids, q_cams, g_cams, q_from_g = make_structure(
      args.queries, args.gallery, args.ids, args.distractors, args.cams, args.junk, args.seed)
  q_feats, g_feats = make_features(g_pids, q_from_g, args.dim, args.seed)
  t = time.perf_counter()
  distmat = evaluation.pairwise_distance(q_feats, g_feats, "cosine")
  t_dist = time.perf_counter() - t
  del q_feats, g_feats
  ids = (q_pids, g_pids, q_cams, g_cams)
  matches = ((q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] != g_cams[None, :])).sum(1)
  # Gallery items per row whose float32 distance equals another's (first 100 rows).
  ties = float(np.mean([r.size - np.unique(r).size for r in distmat[:100]]))

  kw = dict(max_rank=args.gallery, ap=args.ap)
  with PeakRSS() as mem_jax:
    t = time.perf_counter()
    res_jax = evaluation.rank(distmat, *ids, chunk_size=args.chunk_size, **kw)
    t_first = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      res_jax = evaluation.rank(distmat, *ids, chunk_size=args.chunk_size, **kw)
      times.append(time.perf_counter() - t)
  t_jax = float(np.median(times))

  tracemalloc.start()
  t = time.perf_counter()
  res_np = evaluation.rank_reference(distmat, *ids, **kw)
  t_np = time.perf_counter() - t
  np_peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()

  identical = same_results(res_jax, res_np)
  summary = {
      "queries": args.queries, "gallery": args.gallery, "dim": args.dim, "ap": args.ap,
      "true_matches_min": int(matches.min()), "true_matches_mean": float(matches.mean()),
      "true_matches_max": int(matches.max()),
      "tied_items_per_row": ties,
      "distance_s": round(t_dist, 4),
      "jax_rank_s": round(t_jax, 4), "jax_rank_all_s": [round(x, 4) for x in times],
      "jax_first_call_s": round(t_first, 4), "jax_compile_s_est": round(t_first - t_jax, 4),
      "numpy_loop_s": round(t_np, 4), "speedup": round(t_np / t_jax, 1),
      "jax_peak_rss_growth_mb": round(mem_jax.growth / 2**20, 1),
      "numpy_loop_peak_traced_mb": round(np_peak / 2**20, 1),
      "distmat_mb": round(distmat.nbytes / 2**20, 1),
      "identical": bool(identical),
      "R1": res_jax["cmc"][0], "mAP": res_jax["mAP"], "mINP": res_jax["mINP"],
      "num_valid_queries": res_jax["num_valid_queries"],
  }
  print(f"distance matrix {args.queries}x{args.gallery} (cosine, {args.dim}-d): {t_dist:.3f} s")
  print(f"true matches per query: {matches.min()}-{matches.max()} (mean {matches.mean():.1f}); "
        f"float32 ties: {ties:.0f} items per row")
  print(f"jax rank: {t_jax:.3f} s (median of {args.repeats}; first call {t_first:.3f} s incl. "
        f"compile), peak RSS growth {summary['jax_peak_rss_growth_mb']} MB")
  print(f"numpy loop: {t_np:.3f} s, peak traced {summary['numpy_loop_peak_traced_mb']} MB")
  print(f"speed-up {t_np / t_jax:.1f}x; identical results: {identical}")
  print(f"R1 {100 * res_jax['cmc'][0]:.2f}  mAP {100 * res_jax['mAP']:.2f}  "
        f"mINP {100 * res_jax['mINP']:.2f}")
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
