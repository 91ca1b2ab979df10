"""Ranking benchmark at MARS size: `stmn_jax.ranking.rank` vs the per-query NumPy loop.

    python -m benchmarks.ranking [--queries=1980 --gallery=11310 --dim=2048 --repeats=5]
                                 [--ap=noninterp|matlab --junk=0 --chunk_size=2048]
                                 [--gallery_chunk=N (rank_streaming's)]

Synthetic features with MARS-like structure (official protocol): 634 identities plus a pid-0
distractor group (3,248 tracklets) in the gallery over 6 cameras, ~12.7 tracklets per identity,
every query also in the gallery (so 4-20 true matches per query). Distances: cosine, float32.
Checks that both rankings give identical results, prints both times (JAX compile apart), the
speed-up and peak memory, and ends with one JSON line. Also ranks the same features with
`rank_streaming` and reports its time and whether its metrics are bit-identical.

Scaling of the streamed ranking (`stmn_jax.ranking.rank_streaming`, issue #8):

    python -m benchmarks.ranking --scaling [--sizes=1e4,1e5,1e6 --dims=128,2048 --queries=2000]
                                           [--gallery_chunk=N --topk=10 --no_isolate]

2,000 queries against generated galleries (`SyntheticGallery`: chunks made on the fly from
(seed, chunk index), never held whole; 8 tracklets per identity, every 10th item a pid-0
distractor), cosine, running top-10. Each (dim, size) runs in a fresh process and prints wall
time without compilation (compile time apart, generation time included and shown), seconds per
10^5 gallery items, peak RSS growth and the distance kernel's GFLOP/s; then time and memory
ratios between consecutive sizes; last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import jax
import numpy as np

from stmn_jax import ranking
from stmn_jax.ranking import distances, streaming


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


# ------------------------------------------------------------------------------ scaling
TRACKLETS_PER_ID = 8  # consecutive gallery items share an identity
DISTRACTOR_EVERY = 10  # every 10th gallery item is a pid-0 distractor
SIGNAL = 0.6  # identity centre weight (noise has unit variance per dimension)
CENTRE_BANK = 1024  # centre(pid) = bank1[pid % B] + bank2[(pid // B) % B]: B^2 distinct centres


class SyntheticGallery:
  """A gallery generated chunk by chunk, deterministically from (seed, chunk index): never held.

  Item i: pid 0 when i % 10 == 9 (distractor), else 1 + i // 8; camera i % cams; features
  SIGNAL x centre(pid) + N(0, 1) noise (distractors: noise only). Calling the object returns a
  fresh iterator of (feats, pids, camids) chunks (what `rank_streaming` reads twice).
  """

  def __init__(self, size: int, dim: int, chunk: int, seed: int, cams: int):
    self.size, self.dim, self.chunk, self.seed, self.cams = size, dim, chunk, seed, cams
    rng = np.random.default_rng([seed, 0])
    self.bank = rng.standard_normal((2, CENTRE_BANK, dim), dtype=np.float32) * SIGNAL
    self.generate_s = 0.0

  def ids(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pids = np.where(index % DISTRACTOR_EVERY == DISTRACTOR_EVERY - 1, 0,
                    1 + index // TRACKLETS_PER_ID)
    return pids.astype(np.int32), (index % self.cams).astype(np.int32)

  def centres(self, pids: np.ndarray) -> np.ndarray:
    c = self.bank[0][pids % CENTRE_BANK] + self.bank[1][(pids // CENTRE_BANK) % CENTRE_BANK]
    c[pids == 0] = 0.0
    return c

  def chunk_at(self, c: int):
    t = time.perf_counter()
    index = np.arange(c * self.chunk, min((c + 1) * self.chunk, self.size))
    pids, cams = self.ids(index)
    feats = np.random.default_rng([self.seed, 1, c]).standard_normal(
        (index.size, self.dim), dtype=np.float32)
    feats += self.centres(pids)
    self.generate_s += time.perf_counter() - t
    return feats, pids, cams

  def __call__(self):
    return (self.chunk_at(c) for c in range(-(-self.size // self.chunk)))

  def queries(self, num_q: int):
    """New noisy tracklets of num_q identities spread over the gallery; each query's camera is
    that of one of its identity's gallery items (removed as same-camera), so the other-camera
    items of the identity are its true matches."""
    real = np.linspace(0, self.size - 1, num_q * 2).astype(np.int64)
    pids, cams = self.ids(real)
    keep = np.flatnonzero(pids > 0)[:num_q]
    pids, cams = pids[keep], cams[keep]
    rng = np.random.default_rng([self.seed, 2])
    feats = rng.standard_normal((pids.size, self.dim), dtype=np.float32) + self.centres(pids)
    return feats, pids, cams


class CompileTime:
  """Seconds JAX spent tracing, lowering and compiling while inside the block."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")
  _total = 0.0
  _registered = False

  def __enter__(self):
    if not CompileTime._registered:
      jax.monitoring.register_event_duration_secs_listener(CompileTime._listen)
      CompileTime._registered = True
    self.start = CompileTime._total
    return self

  def __exit__(self, *exc):
    self.seconds = CompileTime._total - self.start

  @staticmethod
  def _listen(event, duration, **kwargs):
    if event in CompileTime.EVENTS:
      CompileTime._total += duration


def distance_gflops(num_q: int, chunk: int, dim: int, repeats: int = 3) -> float:
  """GFLOP/s of the ranking's distance kernel alone on one (Q, D) x (chunk, D) block."""
  kernel = distances._distance_block  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  q = jax.device_put(rng.standard_normal((num_q, dim), dtype=np.float32))
  g = jax.device_put(rng.standard_normal((chunk, dim), dtype=np.float32))
  kernel(q, g, "cosine").block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    kernel(q, g, "cosine").block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * num_q * chunk * dim / min(times) / 1e9


def scaling_one(size: int, dim: int, num_q: int, chunk: int | None, topk: int, seed: int,
                cams: int) -> dict:
  """One streamed ranking of num_q queries against a generated gallery of `size` items."""
  if chunk is None:
    chunk = streaming._chunk_rows(  # pylint: disable=protected-access
        None, num_q, jax.device_count(), None)
  gallery = SyntheticGallery(size, dim, chunk, seed, cams)
  q, q_pids, q_cams = gallery.queries(num_q)
  with PeakRSS() as mem, CompileTime() as comp:
    t = time.perf_counter()
    res = ranking.rank_streaming(q, q_pids, q_cams, gallery, metric="cosine",
                                 gallery_chunk=chunk, topk=topk)
    wall = time.perf_counter() - t
  gflops = distance_gflops(num_q, chunk, dim)
  run_s = wall - comp.seconds
  return {
      "gallery": size, "dim": dim, "queries": int(q_pids.size), "gallery_chunk": chunk,
      "wall_s": round(run_s, 3), "compile_s": round(comp.seconds, 3),
      "generate_s": round(gallery.generate_s, 3),
      "rank_s": round(run_s - gallery.generate_s, 3),
      "s_per_1e5": round(run_s / size * 1e5, 3),
      "peak_rss_growth_mb": round(mem.growth / 2**20, 1),
      "distance_gflops": round(gflops, 1),
      # The distance kernel runs once per gallery chunk, twice per match block.
      "distance_s_est": round(2.0 * q_pids.size * size * dim / gflops / 1e9, 3),
      "R1": float(res["cmc"][0]), "mAP": res["mAP"], "num_gallery": res["num_gallery"],
      "num_valid_queries": res["num_valid_queries"],
  }


def scaling(sizes, dims, num_q=2000, chunk=None, topk=10, seed=0, cams=6,
            isolate=True) -> dict:
  """`scaling_one` for every (dim, size), each in a fresh process when `isolate` (so that the
  peak RSS of one run does not hide in memory an earlier run left allocated)."""
  runs = []
  for dim in dims:
    for size in sizes:
      if isolate:
        args = [sys.executable, "-m", "benchmarks.ranking", "--scaling_one",
                f"--sizes={size}", f"--dims={dim}", f"--queries={num_q}", f"--topk={topk}",
                f"--seed={seed}", f"--cams={cams}"]
        if chunk:
          args.append(f"--gallery_chunk={chunk}")
        out = subprocess.run(args, check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        run = json.loads(out.stdout.strip().splitlines()[-1])
      else:
        run = scaling_one(size, dim, num_q, chunk, topk, seed, cams)
      runs.append(run)
      print(f"dim {dim:5d}  gallery {size:>9,}: {run['wall_s']:8.2f} s (compile "
            f"{run['compile_s']:.2f} s apart; generating {run['generate_s']:.2f} s), "
            f"{run['s_per_1e5']:.3f} s per 1e5, peak RSS +{run['peak_rss_growth_mb']} MB, "
            f"distance {run['distance_gflops']} GFLOP/s; R1 {100 * run['R1']:.1f} "
            f"mAP {100 * run['mAP']:.1f}", flush=True)
  checks = []
  for dim in dims:
    by_size = {r["gallery"]: r for r in runs if r["dim"] == dim}
    ordered = sorted(by_size)
    for small, big in zip(ordered, ordered[1:]):
      a, b = by_size[small], by_size[big]
      check = {"dim": dim, "sizes": [small, big], "size_ratio": big / small,
               "time_ratio": round(b["wall_s"] / a["wall_s"], 2),
               "memory_ratio": round(max(b["peak_rss_growth_mb"], 1.0)
                                     / max(a["peak_rss_growth_mb"], 1.0), 2)}
      # Linear: time within [0.5, 1.5] x the size ratio; flat: peak memory within 1.5x.
      check["linear"] = bool(0.5 <= check["time_ratio"] / check["size_ratio"] <= 1.5)
      check["flat_memory"] = bool(check["memory_ratio"] <= 1.5)
      checks.append(check)
      print(f"dim {dim}: gallery x{check['size_ratio']:g} -> time x{check['time_ratio']} "
            f"(linear: {check['linear']}), peak memory x{check['memory_ratio']} "
            f"(flat: {check['flat_memory']})")
  return {"scaling": runs, "checks": checks, "load_average": list(os.getloadavg())}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.ranking")
  p.add_argument("--queries", type=int, default=None, help="default 1980 (2000 with --scaling)")
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
  p.add_argument("--scaling", action="store_true",
                 help="streamed ranking: --queries (default 2000 here) against generated galleries "
                      "of --sizes items at --dims")
  p.add_argument("--scaling_one", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--sizes", default="1e4,1e5,1e6", help="gallery sizes for --scaling")
  p.add_argument("--dims", default="128,2048", help="feature dims for --scaling")
  p.add_argument("--gallery_chunk", type=int, default=None,
                 help="gallery rows per chunk of rank_streaming (default: its own)")
  p.add_argument("--topk", type=int, default=10, help="--scaling: running top-k size")
  p.add_argument("--no_isolate", action="store_true",
                 help="--scaling: run every size in this process (peak RSS less meaningful)")
  args = p.parse_args(argv)
  if args.scaling or args.scaling_one:
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    num_q = args.queries or 2000
    if args.scaling_one:
      summary = scaling_one(sizes[0], dims[0], num_q, args.gallery_chunk, args.topk, args.seed,
                            args.cams)
    else:
      summary = scaling(sizes, dims, num_q, args.gallery_chunk, args.topk, args.seed, args.cams,
                        isolate=not args.no_isolate)
    print(json.dumps(summary))
    return summary
  args.queries = args.queries or 1980

  q_pids, g_pids, q_cams, g_cams, q_from_g = make_structure(
      args.queries, args.gallery, args.ids, args.distractors, args.cams, args.junk, args.seed)
  q_feats, g_feats = make_features(g_pids, q_from_g, args.dim, args.seed)
  t = time.perf_counter()
  distmat = ranking.pairwise_distance(q_feats, g_feats, "cosine")
  t_dist = time.perf_counter() - t
  ids = (q_pids, g_pids, q_cams, g_cams)
  # The streamed ranking of the same features (distances recomputed chunk by chunk).
  with PeakRSS() as mem_stream, CompileTime() as comp_stream:
    t = time.perf_counter()
    res_stream = ranking.rank_streaming(
        q_feats, q_pids, q_cams, (g_feats, g_pids, g_cams), metric="cosine",
        max_rank=args.gallery, ap=args.ap, gallery_chunk=args.gallery_chunk)
    t_stream = time.perf_counter() - t
  t_stream -= comp_stream.seconds
  del q_feats, g_feats
  matches = ((q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] != g_cams[None, :])).sum(1)
  # Gallery items per row whose float32 distance equals another's (first 100 rows).
  ties = float(np.mean([r.size - np.unique(r).size for r in distmat[:100]]))

  kw = dict(max_rank=args.gallery, ap=args.ap)
  with PeakRSS() as mem_jax:
    t = time.perf_counter()
    res_jax = ranking.rank(distmat, *ids, chunk_size=args.chunk_size, **kw)
    t_first = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      res_jax = ranking.rank(distmat, *ids, chunk_size=args.chunk_size, **kw)
      times.append(time.perf_counter() - t)
  t_jax = float(np.median(times))

  tracemalloc.start()
  t = time.perf_counter()
  res_np = ranking.rank_reference(distmat, *ids, **kw)
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
      "stream_gallery_chunk": args.gallery_chunk, "stream_s": round(t_stream, 4),
      "stream_compile_s": round(comp_stream.seconds, 4),
      "stream_peak_rss_growth_mb": round(mem_stream.growth / 2**20, 1),
      "stream_bit_identical": bool(np.array_equal(res_stream["cmc"], res_jax["cmc"])
                                   and res_stream["mAP"] == res_jax["mAP"]
                                   and res_stream["mINP"] == res_jax["mINP"]),
      "stream_mAP_minus_rank_mAP": res_stream["mAP"] - res_jax["mAP"],
      "stream_max_cmc_difference": float(np.abs(res_stream["cmc"] - res_jax["cmc"]).max()),
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
  print(f"streamed (rank_streaming from the features): {t_stream:.3f} s incl. distances "
        f"(compile {comp_stream.seconds:.2f} s apart), peak RSS growth "
        f"{summary['stream_peak_rss_growth_mb']} MB; bit-identical to rank(pairwise_distance): "
        f"{summary['stream_bit_identical']} (mAP difference "
        f"{summary['stream_mAP_minus_rank_mAP']:.3g}, "
        f"CMC {summary['stream_max_cmc_difference']:.3g})")
  print(f"R1 {100 * res_jax['cmc'][0]:.2f}  mAP {100 * res_jax['mAP']:.2f}  "
        f"mINP {100 * res_jax['mINP']:.2f}")
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
