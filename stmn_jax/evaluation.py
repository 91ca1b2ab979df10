"""Retrieval evaluation: distances, exact CMC / mAP / mINP ranking, pooling, re-ranking, CLI.

Protocol (docs: ../shared/docs/datasets-and-evaluation.md section 2), for every query:
- gallery items with the query's pid AND camera are removed, and so are pid -1 (junk) items;
  same-camera items of other pids stay;
- the remaining items are ordered by distance (ascending); equal distances keep gallery order,
  as a stable argsort would;
- a query with no remaining true match is skipped; CMC, mAP and mINP are averages over the
  valid queries (`num_queries_without_match` reports the skipped ones).

`rank` never sorts a gallery row. For a query, the 0-based position of a true match m is the
number of valid gallery items that come before it: distance strictly smaller, or equal with a
lower gallery index. That count is one compare-and-sum over the row per true match
(O(G x matches) per query, no sort), run in a jitted JAX kernel over chunks of (query, true
match) pairs, minus the removed items before the match (a few per query). From the sorted
positions r_1 < ... < r_n of the n true matches (0-based, hits counted from k = 1):
- CMC@j (1-based) = [r_1 < j];
- AP "noninterp" (every Python port) = mean_k k / (r_k + 1);
- AP "matlab" (MARS-evaluation `compute_AP.m`, trapezoid rule) = mean_k (p_{k-1}' + p_k) / 2
  with p_k = k / (r_k + 1) and p_{k-1}' = (k - 1) / r_k the precision just before the hit
  (1 when r_k = 0);
- INP = n / (r_n + 1) (fast-reid's mINP).
Distances are used as given (no epsilon), so float32 ties are resolved exactly.

`rank_streaming` (features) and `rank_distance_blocks` (precomputed distances) give the same
numbers without a (Q, G) matrix: the gallery is read in chunks (arrays, memory maps or a
chunk generator), and the same per-pair counts are accumulated chunk by chunk on a device mesh.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

AP_MODES = ("noninterp", "matlab")
METRICS = ("cosine", "euclidean", "sqeuclidean")
NPZ_KEYS = ("q_feats", "g_feats", "q_pids", "g_pids", "q_camids", "g_camids")
TABLE_RANKS = (1, 5, 10, 20)

# (query, match) pairs per step of the kernel's inner loop: keeps the compare block small
# enough to stay in cache (blocks of tens of MB made XLA:CPU 20-30x slower per element).
_ROWS_PER_STEP = 16


# ------------------------------------------------------------------------------ distances
@functools.partial(jax.jit, static_argnames=("metric",))
def _distance_block(q: jax.Array, g: jax.Array, metric: str) -> jax.Array:
  """(Nq, D), (G, D) -> (Nq, G) float32."""
  q = q.astype(jnp.float32)
  g = g.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  if metric == "cosine":
    qn = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    gn = g / jnp.maximum(jnp.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return 1.0 - jnp.matmul(qn, gn.T, precision=hi)
  sq = (
      jnp.sum(q * q, axis=1)[:, None] + jnp.sum(g * g, axis=1)[None, :]
      - 2.0 * jnp.matmul(q, g.T, precision=hi)
  )
  sq = jnp.maximum(sq, 0.0)
  return sq if metric == "sqeuclidean" else jnp.sqrt(sq)


def pairwise_distance(
    q: Any, g: Any, metric: str = "cosine", chunk_size: int | None = 1024
) -> np.ndarray:
  """(Q, D), (G, D) -> (Q, G) float32 NumPy distance matrix.

  metric:
  - "cosine": 1 - cos(q, g), in [0, 2] (a zero vector is at distance 1 from everything);
    it orders exactly like the -q.g of STMN / AP3D on normalised features;
  - "euclidean": the (non-squared) L2 distance;
  - "sqeuclidean": the squared L2 distance (torchreid's default; same ranking as "euclidean").
  Computed in jitted blocks of `chunk_size` query rows (None: one block); the last block is
  padded so that one shape is compiled.
  """
  if metric not in METRICS:
    raise ValueError(f"distance metric {metric!r}: expected one of {', '.join(METRICS)}")
  q = np.asarray(q, np.float32)
  g = np.asarray(g, np.float32)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(
        f"features: expected q (Q, D) and g (G, D) with the same D, got {q.shape} and {g.shape}"
    )
  n = q.shape[0]
  if chunk_size is None or chunk_size >= n:
    return np.asarray(_distance_block(_to_device(q), _to_device(g), metric))
  if chunk_size < 1:
    raise ValueError(f"chunk_size = {chunk_size}: expected >= 1 or None")
  gj = _to_device(g)
  out = _aligned_empty((n, g.shape[0]))  # aligned: `rank` moves it to the device fast
  for start in range(0, n, chunk_size):
    block = q[start:start + chunk_size]
    rows = block.shape[0]
    if rows < chunk_size:
      block = np.pad(block, ((0, chunk_size - rows), (0, 0)))
    out[start:start + rows] = np.asarray(_distance_block(block, gj, metric))[:rows]
  return out


# ------------------------------------------------------------------------------ ranking
def _check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, ap):
  if ap not in AP_MODES:
    raise ValueError(f"ap = {ap!r}: expected one of {', '.join(AP_MODES)}")
  if int(max_rank) < 1:
    raise ValueError(f"max_rank = {max_rank}: expected >= 1")
  if len(distmat.shape) != 2:
    raise ValueError(f"distmat: expected a (Q, G) matrix, got shape {tuple(distmat.shape)}")
  nq, ng = distmat.shape
  arrays = {}
  for name, x, n in (
      ("q_pids", q_pids, nq), ("g_pids", g_pids, ng),
      ("q_camids", q_camids, nq), ("g_camids", g_camids, ng),
  ):
    x = np.asarray(x)
    if x.shape != (n,):
      raise ValueError(f"{name}: expected shape ({n},) to match distmat {tuple(distmat.shape)}, "
                       f"got {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name}: expected integer ids, got dtype {x.dtype}")
    arrays[name] = x.astype(np.int64)
  return arrays


def _same_pid_items(q_pids, g_pids, q_camids, g_camids):
  """Each query's true matches and its removed same-camera items, as padded index tables.

  Returns (match_idx (Q, M), match_counts (Q,), same_cam_idx (Q, S), same_cam_counts (Q,)):
  gallery indices with the query's pid in another camera (true matches) and in the query's
  camera (removed), in gallery order, the first `counts` of each row real. Found by grouping
  the gallery by pid (one sort of the pid vector), never by a (Q, G) comparison. A pid -1
  query has neither (pid -1 gallery items are junk, handled by the caller).
  """
  order = np.argsort(g_pids, kind="stable")
  sorted_pids = g_pids[order]
  lo = np.searchsorted(sorted_pids, q_pids, side="left")
  hi = np.where(q_pids == -1, lo, np.searchsorted(sorted_pids, q_pids, side="right"))
  width = max(int((hi - lo).max(initial=0)), 1)
  slot = np.arange(width)
  in_group = slot[None, :] < (hi - lo)[:, None]
  cand = order[np.minimum(lo[:, None] + slot[None, :], max(len(order) - 1, 0))] if len(order) \
      else np.zeros((len(q_pids), width), np.int64)
  same_cam = g_camids[cand] == q_camids[:, None] if len(order) else in_group
  tables = []
  for keep in (in_group & ~same_cam, in_group & same_cam):
    # Move the kept entries to the front of each row (stable: gallery order is kept).
    perm = np.argsort(~keep, axis=1, kind="stable")
    counts = keep.sum(axis=1)
    w = max(int(counts.max(initial=0)), 1)
    tables += [np.take_along_axis(cand, perm, axis=1)[:, :w].astype(np.int32), counts]
  return tuple(tables)


@functools.partial(jax.jit, static_argnames=("rows_per_step", "has_junk"))
def _match_positions(
    distmat: jax.Array,
    junk: jax.Array,
    pair_q: jax.Array,
    pair_g: jax.Array,
    pair_removed: jax.Array,
    pair_num_removed: jax.Array,
    rows_per_step: int,
    has_junk: bool,
) -> jax.Array:
  """0-based position of each (query, true match) pair among the query's valid gallery items.

  distmat (Q, G); junk (G,) bool marks pid -1 columns (used when has_junk); pair_q, pair_g
  (P,) query row and gallery column of a true match; pair_removed (P, S) the query's same-pid same-camera gallery columns, the first
  pair_num_removed (P,) real -> (P,) int32. Position = number of items before the match
  (smaller distance, or equal and lower column) minus the removed items among them. P must be
  a multiple of rows_per_step; rows are processed rows_per_step at a time (lax.map), so the
  compare block stays small.
  """
  gallery_index = jnp.arange(distmat.shape[1], dtype=jnp.int32)
  slots = jnp.arange(pair_removed.shape[1], dtype=jnp.int32)

  def comes_before(d, index, dm, im):
    return (d < dm) | ((d == dm) & (index < im))

  def step(args):
    r, i, rem, n_rem = args  # (s,), (s,), (s, S), (s,)
    d = jnp.take(distmat, r, axis=0)  # (s, G)
    if has_junk:  # NaN never compares true: junk items never come "before" a match
      d = jnp.where(junk[None, :], jnp.nan, d)
    dm = jnp.take_along_axis(d, i[:, None], axis=1)  # (s, 1): the match's own distance
    before = comes_before(d, gallery_index[None, :], dm, i[:, None])
    # float32 sum is exact (G < 2^24) and takes XLA:CPU's fast reduction path.
    count = jnp.sum(before.astype(jnp.float32), axis=1).astype(jnp.int32)
    d_rem = jnp.take_along_axis(d, rem, axis=1)  # (s, S)
    removed = comes_before(d_rem, rem, dm, i[:, None]) & (slots[None, :] < n_rem[:, None])
    return count - jnp.sum(removed, axis=1, dtype=jnp.int32)

  p, s = pair_q.shape[0], rows_per_step
  out = jax.lax.map(step, (
      pair_q.reshape(p // s, s), pair_g.reshape(p // s, s),
      pair_removed.reshape(p // s, s, -1), pair_num_removed.reshape(p // s, s),
  ))
  return out.reshape(p)


def _metrics_from_positions(pos: np.ndarray, counts: np.ndarray, ap: str) -> dict[str, np.ndarray]:
  """(V, M) ascending 0-based match positions (padding beyond counts) -> per-query metrics."""
  m = pos.shape[1]
  k = np.arange(1, m + 1, dtype=np.float64)[None, :]
  real = k <= counts[:, None]
  r = pos.astype(np.float64)
  precision = k / (r + 1.0)
  if ap == "noninterp":
    terms = precision
  else:
    before = np.where(r > 0, (k - 1.0) / np.maximum(r, 1.0), 1.0)
    terms = 0.5 * (before + precision)
  ap_q = np.where(real, terms, 0.0).sum(axis=1) / counts
  last = np.take_along_axis(r, (counts - 1)[:, None], axis=1)[:, 0]
  return {"ap": ap_q, "first": pos[:, 0], "inp": counts / (last + 1.0)}


def rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
    ap: str = "noninterp",
    chunk_size: int = 2048,
) -> dict:
  """Exact CMC / mAP / mINP of a (Q, G) distance matrix (see the module docstring).

  Returns {"cmc": (max_rank,) float64 fractions, "mAP", "mINP": fractions,
  "num_valid_queries", "num_queries_without_match"}.

  The work unit is a (query, true match) pair: a jitted kernel counts, for `chunk_size` pairs
  per call (rounded up to a multiple of 16; the last call padded, so one shape is compiled),
  the gallery items that come before each match, 16 pairs at a time; memory beyond the
  distance matrix is O(chunk_size + 16 x G). pid -1 items are set to NaN in those 16-row
  blocks (NaN never compares true, so they never come before a match). The metrics are then
  computed in float64 from the positions. distmat may be NumPy or a jax.Array; +-inf is
  allowed. Raises ValueError on NaN distances or when no query has a true match.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size = {chunk_size}: expected >= 1")
  if not isinstance(distmat, jax.Array):
    distmat = np.asarray(distmat)
  ids = _check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, ap)
  num_q, num_g = distmat.shape
  match_idx, counts, removed_idx, num_removed = _same_pid_items(
      ids["q_pids"], ids["g_pids"], ids["q_camids"], ids["g_camids"])
  valid_q = np.flatnonzero(counts > 0)
  if valid_q.size == 0:
    raise ValueError(f"none of the {num_q} queries has a true match in the gallery "
                     "(same pid, other camera, pid != -1)")
  d = _to_device(distmat)
  _check_no_nan(d)
  junk = ids["g_pids"] == -1

  # One pair per (valid query, true match), in query order.
  pair_q = np.repeat(np.arange(num_q), counts).astype(np.int32)
  slot = np.arange(pair_q.size) - np.repeat(np.cumsum(counts) - counts, counts)
  pair_g = match_idx[pair_q, slot]
  total = pair_q.size
  chunk_size = _round_up(min(chunk_size, total), _ROWS_PER_STEP)
  padded = _round_up(total, chunk_size)
  pad = lambda x: np.concatenate([x, np.zeros((padded - total,) + x.shape[1:], x.dtype)])
  pair_q, pair_g = pad(pair_q), pad(pair_g)
  pair_removed = pad(removed_idx[pair_q[:total]])
  pair_num_removed = pad(num_removed[pair_q[:total]].astype(np.int32))
  outs = [
      _match_positions(
          d, jnp.asarray(junk), pair_q[a:a + chunk_size], pair_g[a:a + chunk_size],
          pair_removed[a:a + chunk_size], pair_num_removed[a:a + chunk_size],
          rows_per_step=_ROWS_PER_STEP, has_junk=bool(junk.any()),
      )
      for a in range(0, padded, chunk_size)
  ]
  positions = np.concatenate([np.asarray(o) for o in outs])[:total]
  return _results_from_positions(
      pair_q[:total], slot, positions, counts, match_idx.shape[1], num_g, max_rank, ap)


def _results_from_positions(
    pair_q: np.ndarray, slot: np.ndarray, positions: np.ndarray, counts: np.ndarray,
    width: int, num_g: int, max_rank: int, ap: str,
) -> dict:
  """Per-pair positions -> `rank`'s dict. pair_q, slot, positions (P,): query row, index among
  the query's matches and 0-based position of each (query, true match) pair; counts (Q,) true
  matches per query; width >= counts.max() (the table's row width: the float64 sums depend on
  it, so `rank` and `rank_streaming` pass the same)."""
  num_q = counts.size
  valid_q = np.flatnonzero(counts > 0)
  table = np.full((num_q, width), num_g, np.int64)
  table[pair_q, slot] = positions
  table = np.sort(table[valid_q], axis=1)
  per_query = _metrics_from_positions(table, counts[valid_q], ap)
  first_hits = np.bincount(np.minimum(per_query["first"], max_rank), minlength=max_rank + 1)
  cmc = np.cumsum(first_hits[:max_rank]) / valid_q.size
  return {
      "cmc": cmc,
      "mAP": float(per_query["ap"].mean()),
      "mINP": float(per_query["inp"].mean()),
      "num_valid_queries": int(valid_q.size),
      "num_queries_without_match": int(num_q - valid_q.size),
  }


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
  """An uninitialised float32 array whose data starts on a 64-byte boundary."""
  nbytes = int(np.prod(shape)) * 4
  buf = np.empty(nbytes + 64, np.uint8)
  offset = (-buf.ctypes.data) % 64
  return buf[offset:offset + nbytes].view(np.float32).reshape(shape)


def _to_device(x: Any) -> jax.Array:
  """A float32 jax.Array of x on one device. NumPy input is first copied to a 64-byte aligned buffer when it
  is not aligned: on CPU, `device_put` of an aligned array was ~10x faster than of an unaligned
  one or than `jnp.asarray` (90 MB: 0.05 s vs 0.45-0.7 s on the loaded dev machine)."""
  if isinstance(x, jax.Array):
    if len(x.sharding.device_set) == 1:
      return x.astype(jnp.float32)
    # A sharded matrix (its typed sharding would follow it into the kernel's gathers): through
    # the host onto one device; gathered from every process first when not all addressable.
    if not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      x = multihost_utils.process_allgather(x, tiled=True)
  x = np.asarray(x, np.float32)
  if not x.flags.c_contiguous or x.ctypes.data % 64:
    aligned = _aligned_empty(x.shape)
    aligned[...] = x
    x = aligned
  return jax.device_put(x)


@jax.jit
def _row_sums(d: jax.Array) -> jax.Array:
  return jnp.sum(d, axis=1)


@jax.jit
def _rows_with_nan(d: jax.Array, rows: jax.Array) -> jax.Array:
  return jnp.isnan(jnp.take(d, rows, axis=0)).any(axis=1)


def _check_no_nan(d: jax.Array) -> None:
  """Raises ValueError naming the first rows of d that hold a NaN. A row sum is NaN when the row
  holds a NaN (or both infinities): one fast reduction, exact check only on flagged rows."""
  flagged = np.flatnonzero(np.isnan(np.asarray(_row_sums(d))))
  if flagged.size:
    bad = flagged[np.asarray(_rows_with_nan(d, jnp.asarray(flagged)))]
    if bad.size:
      raise ValueError(f"distmat: NaN distances in {bad.size} query row(s), first: "
                       f"{bad[:10].tolist()}")


def rank_reference(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
    ap: str = "noninterp",
) -> dict:
  """The per-query NumPy loop (torchreid's `eval_market1501` with a stable argsort): same output
  as `rank`. Slow; for tests and the benchmark."""
  ids = _check_rank_inputs(np.asarray(distmat), q_pids, g_pids, q_camids, g_camids, max_rank, ap)
  distmat = np.asarray(distmat)
  q_pids, g_pids = ids["q_pids"], ids["g_pids"]
  q_camids, g_camids = ids["q_camids"], ids["g_camids"]
  cmcs, aps, inps = [], [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")
    remove = ((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])) | (
        g_pids[order] == -1)
    raw = (g_pids[order] == q_pids[i])[~remove].astype(np.float64)
    if not raw.any():
      continue
    cmc = np.minimum(raw.cumsum(), 1.0)
    cmc = np.concatenate([cmc, np.ones(max(0, max_rank - cmc.size))])
    cmcs.append(cmc[:max_rank])
    hits = np.flatnonzero(raw)
    num_rel = raw.sum()
    if ap == "noninterp":
      precision = raw.cumsum() / np.arange(1, raw.size + 1)
      aps.append((precision * raw).sum() / num_rel)
    else:  # MATLAB compute_AP: walk the list, trapezoid between consecutive precisions
      old_recall, old_precision, total, hit = 0.0, 1.0, 0.0, 0
      for j in range(hits[-1] + 1):
        hit += int(raw[j])
        recall, precision = hit / num_rel, hit / (j + 1)
        total += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
      aps.append(total)
    inps.append(num_rel / (hits[-1] + 1))
  if not cmcs:
    raise ValueError(f"none of the {distmat.shape[0]} queries has a true match in the gallery")
  return {
      "cmc": np.mean(cmcs, axis=0),
      "mAP": float(np.mean(aps)),
      "mINP": float(np.mean(inps)),
      "num_valid_queries": len(cmcs),
      "num_queries_without_match": int(distmat.shape[0] - len(cmcs)),
  }


# ------------------------------------------------------------------------------ streaming
# Default gallery chunk: about this many (query, gallery) distances per block (64 MB float32),
# clipped to [_STREAM_MIN_CHUNK, _STREAM_MAX_CHUNK] gallery rows.
_STREAM_BLOCK_ELEMENTS = 1 << 24
_STREAM_MIN_CHUNK, _STREAM_MAX_CHUNK = 1024, 65536
# The (query, match) pairs of one match block are padded to a power of two, at least this.
_STREAM_MIN_PAIRS = 128
_INT32 = np.iinfo(np.int32)
# `python -m stmn_jax.evaluation --query --gallery` streams galleries above this many rows.
STREAM_ABOVE = 100_000

GalleryChunk = tuple[Any, Any, Any]


def _ranked_value(d: jax.Array, skip: jax.Array) -> jax.Array:
  """(Q, c) distances -> float32 values whose descending total order (lax.top_k's) is the
  ascending distance order: -d with -0.0 == +0.0, and skipped items at -NaN, below -inf."""
  neg_nan = jax.lax.bitcast_convert_type(jnp.int32(-1), jnp.float32)
  return jnp.where(skip, neg_nan, -jnp.where(d == 0, jnp.zeros_like(d), d))


def _removed_or_junk(gp: jax.Array, gc: jax.Array, qp: jax.Array, qc: jax.Array) -> jax.Array:
  """(c,) gallery pids / cams, (Q,) query pids / cams -> (Q, c) True where an item is not
  ranked for that query: junk (pid -1, also padding and masked columns) or same pid and camera."""
  return (gp[None, :] == -1) | ((gp[None, :] == qp[:, None]) & (gc[None, :] == qc[:, None]))


def _local_distances(x: jax.Array, q: jax.Array | None, metric: str | None) -> jax.Array:
  """One device's share of a chunk -> its (Q, c) distances: features (c, D) through
  `_distance_block` (the kernel of `pairwise_distance`), or a given distance block (Q, c)."""
  return x.astype(jnp.float32) if metric is None else _distance_block(q, x, metric)


@functools.lru_cache(maxsize=None)
def _stream_kernels(mesh: Any, metric: str | None, topk: int):
  """The two jitted per-chunk kernels for a mesh, a metric (None: distance blocks) and k.

  A chunk's gallery rows are split over the mesh's 'data' axis (shard_map): each device
  computes the distances to its own consecutive columns. Every column carries its global
  gallery index `gidx` (ties are broken by it), pid and camera (pid -1: not ranked).
  - `match_distances(x, q, pair_q, pair_col) -> (any NaN, (devices * m,) per-device dm)`: the
    distance of each (query, chunk column) pair, read on the device that holds the column;
  - `count(before, top_v, top_i, x, gp, gc, gidx, q, qp, qc, pair_q, pair_dm, pair_im)
    -> (before + the chunk's items ahead of each pair's match, merged running top-k, any NaN)`.
  """
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from stmn_jax import sharding  # pylint: disable=g-import-not-at-top

  ax = sharding.DATA_AXIS
  x_spec = P(ax, None) if metric is not None else P(None, ax)
  rep = P()

  def any_bad(d, x):
    bad = jnp.isnan(d).any()
    if metric is not None:
      bad = bad | ~jnp.isfinite(x).all()
    return jax.lax.pmax(bad.astype(jnp.int32), ax) > 0

  def dm_local(x, q, pair_q, pair_col):
    d = _local_distances(x, q, metric)
    c = d.shape[1]
    local = pair_col - jax.lax.axis_index(ax) * c
    mine = (local >= 0) & (local < c)
    return any_bad(d, x), jnp.where(mine, d[pair_q, jnp.clip(local, 0, c - 1)], 0.0)

  def count_local(x, gp, gc, gidx, q, qp, qc, pair_q, pair_dm, pair_im, top_v, top_i):
    d = _local_distances(x, q, metric)
    bad = any_bad(d, x)
    skip = _removed_or_junk(gp, gc, qp, qc)
    if topk:
      v, j = jax.lax.top_k(_ranked_value(d, skip), min(topk, d.shape[1]))  # ties: lower column
      gather = lambda a: jax.lax.all_gather(a, ax, axis=1, tiled=True)  # device = column order
      # Running entries first: they come from earlier columns (lower gallery indices).
      v, sel = jax.lax.top_k(jnp.concatenate([top_v, gather(v)], axis=1), topk)
      top_i = jnp.take_along_axis(
          jnp.concatenate([top_i, gather(jnp.take(gidx, j))], axis=1), sel, axis=1)
      top_v = v
    # NaN never compares true: junk, padding and removed items never come before a match.
    d = jnp.where(skip, jnp.nan, d)

    def step(args):
      r, dm, im = args  # (s,) each
      rows = jnp.take(d, r, axis=0)  # (s, c)
      ahead = (rows < dm[:, None]) | ((rows == dm[:, None]) & (gidx[None, :] < im[:, None]))
      # float32 sum is exact (c < 2^24) and takes XLA:CPU's fast reduction path.
      return jnp.sum(ahead.astype(jnp.float32), axis=1).astype(jnp.int32)

    p, s = pair_q.shape[0], _ROWS_PER_STEP
    counts = jax.lax.map(step, (pair_q.reshape(p // s, s), pair_dm.reshape(p // s, s),
                                pair_im.reshape(p // s, s)))
    return jax.lax.psum(counts.reshape(p), ax), top_v, top_i, bad

  match_distances = jax.jit(jax.shard_map(
      dm_local, mesh=mesh, in_specs=(x_spec, rep, rep, rep), out_specs=(rep, P(ax)),
      check_vma=False))

  @jax.jit
  def count(before, top_v, top_i, x, gp, gc, gidx, q, qp, qc, pair_q, pair_dm, pair_im):
    ahead, top_v, top_i, bad = jax.shard_map(
        count_local, mesh=mesh,
        in_specs=(x_spec, P(ax), P(ax), P(ax), rep, rep, rep, rep, rep, rep, rep, rep),
        out_specs=(rep, rep, rep, rep), check_vma=False,
    )(x, gp, gc, gidx, q, qp, qc, pair_q, pair_dm, pair_im, top_v, top_i)
    return before + ahead, top_v, top_i, bad

  return match_distances, count


def _check_ids(name: str, x: Any, n: int | None, where: str) -> np.ndarray:
  """(n,) integer ids within int32 -> int32, else a ValueError naming `where` and `name`."""
  x = np.asarray(x)
  if x.ndim != 1 or (n is not None and x.shape[0] != n):
    want = f"({n},)" if n is not None else "(n,)"
    raise ValueError(f"{where}{name}: expected shape {want}, got {x.shape}")
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{where}{name}: expected integer ids, got dtype {x.dtype}")
  if x.size and (x.min() < _INT32.min or x.max() > _INT32.max):
    raise ValueError(f"{where}{name}: ids must fit in int32, got range [{x.min()}, {x.max()}]")
  return x.astype(np.int32)


def _is_array_triple(gallery: Any) -> bool:
  """(x 2-D array, pids, camids), as opposed to a list of chunks (whose items are tuples)."""
  return (isinstance(gallery, (tuple, list)) and len(gallery) == 3
          and getattr(gallery[0], "ndim", None) == 2)


def _source(gallery: Any, axis: int, chunk: int) -> Callable[[], Iterable[GalleryChunk]]:
  """gallery -> a function returning a fresh iterator of (x, pids, camids) source chunks.

  Arrays (x, pids, camids) (NumPy, np.memmap, ...) are sliced along `axis` into pieces of
  `chunk`; a callable is called once per pass; a re-iterable (list, tuple) is iterated once per
  pass. A one-shot iterator (generator) is refused: the gallery is read twice.
  """
  if _is_array_triple(gallery):
    x, pids, cams = gallery[0], np.asarray(gallery[1]), np.asarray(gallery[2])
    n = x.shape[axis]
    if pids.shape != (n,) or cams.shape != (n,):
      raise ValueError(f"gallery: pids and camids must have shape ({n},) to match the "
                       f"{'features' if axis == 0 else 'distances'} {x.shape}, got "
                       f"{pids.shape} and {cams.shape}")

    def slices():
      for a in range(0, n, chunk):
        part = (slice(None),) * axis + (slice(a, a + chunk),)
        yield x[part], pids[a:a + chunk], cams[a:a + chunk]
    return slices
  if callable(gallery):
    return gallery
  if isinstance(gallery, Iterator):
    raise ValueError("gallery: a one-shot iterator (e.g. a generator) cannot be read twice; "
                     "pass a list of (feats, pids, camids) chunks, arrays, or a function that "
                     "returns a fresh iterator of chunks")
  if isinstance(gallery, Iterable):
    return lambda: iter(gallery)
  raise ValueError(f"gallery: expected (feats, pids, camids) arrays, a list of such chunks or a "
                   f"function returning an iterator of them, got {type(gallery).__name__}")


def _checked_chunks(
    chunks: Iterable[Any], axis: int, other: int, size: int, what: str
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
  """Validates source chunks and re-cuts them into consecutive pieces of exactly `size` gallery
  rows (the last one shorter) -> (start, x float32, pids int32, camids int32).

  x's gallery axis is `axis` (0: features (n, D); 1: distances (Q, n)) and its other axis must
  have length `other` (D or Q). Memory: at most one piece plus one source chunk.
  """
  buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
  have, start = 0, 0
  other_name = "feature dim D" if axis == 0 else "number of queries Q"

  def flush():
    nonlocal buf, have, start
    xs, ps, cs = zip(*buf)
    out = (start, np.concatenate(xs, axis=axis) if len(xs) > 1 else xs[0],
           np.concatenate(ps) if len(ps) > 1 else ps[0],
           np.concatenate(cs) if len(cs) > 1 else cs[0])
    start += have
    buf, have = [], 0
    return out

  offset = 0
  for i, item in enumerate(chunks):
    where = f"{what} chunk {i} (from gallery row {offset}): "
    if not isinstance(item, (tuple, list)) or len(item) != 3:
      raise ValueError(f"{where}expected a (feats, pids, camids) tuple, got "
                       f"{type(item).__name__}")
    x = np.asarray(item[0])
    if x.ndim != 2 or x.shape[1 - axis] != other:
      shape = "(n, D)" if axis == 0 else "(Q, n)"
      raise ValueError(f"{where}expected {shape} with {other_name} = {other}, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
      raise ValueError(f"{where}expected real numbers, got dtype {x.dtype}")
    n = x.shape[axis]
    pids = _check_ids("pids", item[1], n, where)
    cams = _check_ids("camids", item[2], n, where)
    x = x.astype(np.float32, copy=False)
    a = 0
    while a < n:
      take = min(size - have, n - a)
      part = (slice(None),) * axis + (slice(a, a + take),)
      buf.append((x[part], pids[a:a + take], cams[a:a + take]))
      have += take
      a += take
      if have == size:
        yield flush()
    offset += n
  if have:
    yield flush()


def _pad_to(x: np.ndarray, size: int, axis: int, value: Any = 0) -> np.ndarray:
  n = x.shape[axis]
  if n == size:
    return np.ascontiguousarray(x)
  width = [(0, 0)] * x.ndim
  width[axis] = (0, size - n)
  return np.pad(x, width, constant_values=value)


def _next_pow2(n: int, least: int) -> int:
  return max(least, 1 << max(int(n) - 1, 0).bit_length())


def _find_matches(start, pids, cams, q_order, sorted_qp, q_cams):
  """Host side, one chunk: (query, gallery index) of its true matches (same pid, other camera,
  pid != -1), found through the sorted query pids (O(c log Q), no (Q, c) table)."""
  lo = np.searchsorted(sorted_qp, pids, side="left")
  hi = np.searchsorted(sorted_qp, pids, side="right")
  n = np.where(pids == -1, 0, hi - lo)
  item = np.repeat(np.arange(pids.size), n)
  k = np.arange(item.size) - np.repeat(np.cumsum(n) - n, n)
  q = q_order[lo[item] + k]
  keep = cams[item] != q_cams[q]
  return q[keep], (start + item[keep]).astype(np.int64)


def _chunk_rows(gallery_chunk: int | None, num_q: int, num_devices: int,
                num_g: int | None) -> int:
  if gallery_chunk is None:
    c = min(max(_STREAM_BLOCK_ELEMENTS // max(num_q, 1), _STREAM_MIN_CHUNK), _STREAM_MAX_CHUNK)
    if num_g is not None:  # equal chunks: as few padded rows as possible
      c = -(-max(num_g, 1) // -(-max(num_g, 1) // c))
  else:
    c = int(gallery_chunk)
    if c < 1:
      raise ValueError(f"gallery_chunk = {gallery_chunk}: expected >= 1 or None")
  return _round_up(c, num_devices)


def _bad_rows(x: np.ndarray, q: np.ndarray | None, metric: str | None, axis: int) -> np.ndarray:
  """Error path: the gallery rows of a chunk with non-finite features or NaN distances."""
  if metric is None:
    return np.flatnonzero(np.isnan(x).any(axis=0))
  bad = ~np.isfinite(x).all(axis=1)
  if not bad.any():
    bad = np.isnan(pairwise_distance(q, x, metric, chunk_size=None)).any(axis=0)
  return np.flatnonzero(bad)


def _fingerprint(pids: np.ndarray, cams: np.ndarray) -> tuple[int, int]:
  import zlib  # pylint: disable=g-import-not-at-top

  return pids.size, zlib.crc32(pids.tobytes() + cams.tobytes())


def _rank_stream(
    source: Callable[[], Iterable[Any]], q: np.ndarray | None, q_pids: np.ndarray,
    q_cams: np.ndarray, *, metric: str | None, other: int, chunk: int, max_rank: int, ap: str,
    topk: int, mesh: Any, what: str,
) -> dict:
  """The passes shared by `rank_streaming` (features) and `rank_distance_blocks`.

  1. Scan (no distances): find every (query, true match) pair from the chunks' pids and keep a
     copy of the rows of the gallery items that are someone's true match (the "match rows",
     at most Q x max matches of them, in gallery order).
  2. Match blocks: the match rows, cut into chunks of the same shape, go through the distance
     kernel; each pair's distance dm is read from the block that holds its match.
  3. Count: the match blocks again (same kernel, same input: the same values), then every
     gallery chunk once with its match rows masked out (they are ranked through the match
     blocks), counting per pair the ranked items ahead of the match and merging the top-k.
  So every (query, gallery item) distance that takes part in the ranking is computed by one
  kernel call on one input (the match blocks' twice, deterministically), and all comparisons
  see the same float32 values: the counts are exact for those values.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from stmn_jax import sharding  # pylint: disable=g-import-not-at-top

  ax = sharding.DATA_AXIS
  axis = 0 if metric is not None else 1
  num_q = q_pids.size
  match_distances, count = _stream_kernels(mesh, metric, topk)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  x_spec = P(ax, None) if axis == 0 else P(None, ax)
  qd = put(q, P()) if q is not None else None
  qp_d, qc_d = put(q_pids, P()), put(q_cams, P())

  def device_chunk(x, pids, cams, gidx):
    return (put(_pad_to(x, chunk, axis), x_spec), put(_pad_to(pids, chunk, 0, -1), P(ax)),
            put(_pad_to(cams, chunk, 0, -1), P(ax)), put(_pad_to(gidx, chunk, 0, -1), P(ax)))

  def check(bad, x, start, gidx):
    if bool(bad):
      rows = gidx[_bad_rows(x, q, metric, axis)]
      cause = "non-finite feature values or NaN distances" if metric else "NaN distances"
      raise ValueError(f"{what}: {cause} at gallery row(s) {rows[:10].tolist()} "
                       f"({rows.size} in the chunk from row {start})")

  # 1. Scan.
  order = np.argsort(q_pids, kind="stable")
  sorted_qp = q_pids[order]
  found_q, found_g, prints, rows = [], [], [], []
  num_g = 0
  for start, x, pids, cams in _checked_chunks(source(), axis, other, chunk, what):
    if start + chunk > _INT32.max:
      raise ValueError(f"{what}: more than {_INT32.max - chunk} gallery items are not supported")
    prints.append(_fingerprint(pids, cams))
    mq, mg = _find_matches(start, pids, cams, order, sorted_qp, q_cams)
    if mq.size:
      cols = np.unique(mg - start)
      found_q.append(mq)
      found_g.append(mg)
      rows.append((np.take(x, cols, axis=axis), pids[cols], cams[cols], start + cols))
    num_g = start + pids.size
  if num_g == 0:
    raise ValueError(f"{what}: the gallery is empty")
  if not found_q:
    raise ValueError(f"none of the {num_q} queries has a true match in the gallery "
                     "(same pid, other camera, pid != -1)")
  pair_q, pair_g = np.concatenate(found_q), np.concatenate(found_g)
  srt = np.lexsort((pair_g, pair_q))  # query order, then gallery order (as `rank`)
  pair_q, pair_g = pair_q[srt], pair_g[srt]
  counts = np.bincount(pair_q, minlength=num_q)
  slot = np.arange(pair_q.size) - np.repeat(np.cumsum(counts) - counts, counts)
  m_x = np.concatenate([r[0] for r in rows], axis=axis)
  m_pids, m_cams, m_gidx = (np.concatenate([r[i] for r in rows]) for i in (1, 2, 3))
  m_gidx = m_gidx.astype(np.int32)
  del rows
  part = (slice(None),) * axis
  match_blocks = [
      (b, m_x[part + (slice(b, b + chunk),)], m_pids[b:b + chunk], m_cams[b:b + chunk],
       m_gidx[b:b + chunk]) for b in range(0, m_gidx.size, chunk)]

  # 2. Each pair's own distance, from the match block that holds its match.
  pos = np.searchsorted(m_gidx, pair_g)
  pair_dm = np.zeros(pair_q.size, np.float32)
  for b, x, pids, cams, gidx in match_blocks:
    inside = np.flatnonzero((pos >= b) & (pos < b + chunk))
    m = _next_pow2(inside.size, _STREAM_MIN_PAIRS)
    bad, dm = match_distances(
        device_chunk(x, pids, cams, gidx)[0], qd,
        _pad_to(pair_q[inside].astype(np.int32), m, 0),
        _pad_to((pos[inside] - b).astype(np.int32), m, 0))
    check(bad, x, int(gidx[0]), gidx)
    owner = (pos[inside] - b) // (chunk // mesh.size)
    pair_dm[inside] = np.asarray(dm).reshape(mesh.size, m)[owner, np.arange(inside.size)]

  # 3. Count (and the top-k: one running list for the match blocks, one for the gallery chunks,
  # each fed in gallery order so that lax.top_k's lower-position-first keeps index order).
  total = pair_q.size
  padded = _round_up(total, _ROWS_PER_STEP)
  pairs = (put(_pad_to(pair_q.astype(np.int32), padded, 0), P()),
           put(_pad_to(pair_dm, padded, 0, np.nan), P()),
           put(_pad_to(pair_g.astype(np.int32), padded, 0), P()))
  before = put(np.zeros(padded, np.int32), P())
  neg_nan = np.array(-1, np.int32).view(np.float32)
  empty_top = lambda: (put(np.full((num_q, topk), neg_nan, np.float32), P()),
                       put(np.full((num_q, topk), -1, np.int32), P()))
  tops = [empty_top(), empty_top()]

  def stream():
    for _, x, pids, cams, gidx in match_blocks:
      yield 0, x, pids, cams, gidx
    i = -1
    for i, (start, x, pids, cams) in enumerate(
        _checked_chunks(source(), axis, other, chunk, what)):
      if i >= len(prints) or prints[i] != _fingerprint(pids, cams):
        raise ValueError(f"{what}: the gallery changed between passes (chunk {i} from row "
                         f"{start}); a callable gallery must return the same chunks every call")
      gidx = np.arange(start, start + pids.size, dtype=np.int32)
      lo, hi = np.searchsorted(m_gidx, [start, start + pids.size])
      pids = pids.copy()
      pids[m_gidx[lo:hi] - start] = -1  # match rows: ranked in the match blocks
      yield 1, x, pids, cams, gidx
    if i + 1 != len(prints):
      raise ValueError(f"{what}: the gallery changed between passes ({len(prints)} chunks, then "
                       f"{i + 1}); a callable gallery must return the same chunks every call")

  pending = None
  for which, x, pids, cams, gidx in stream():
    before, top_v, top_i, bad = count(
        before, *tops[which], *device_chunk(x, pids, cams, gidx), qd, qp_d, qc_d, *pairs)
    tops[which] = (top_v, top_i)
    if pending is not None:  # at most two chunks in flight: memory stays bounded
      check(*pending)
    pending = (bad, x, int(gidx[0]), gidx)
  check(*pending)
  positions = np.asarray(before)[:total].astype(np.int64)
  results = _results_from_positions(
      pair_q, slot, positions, counts, max(int(counts.max()), 1), num_g, max_rank, ap)
  results["num_gallery"] = int(num_g)
  if topk:
    dist = -np.concatenate([np.asarray(t[0]) for t in tops], axis=1)  # NaN: no item
    idx = np.concatenate([np.asarray(t[1]) for t in tops], axis=1).astype(np.int64)
    empty = np.isnan(dist)
    sel = np.lexsort((idx, np.where(empty, 0.0, dist), empty), axis=1)[:, :topk]
    empty = np.take_along_axis(empty, sel, axis=1)
    results["topk_index"] = np.where(empty, -1, np.take_along_axis(idx, sel, axis=1))
    results["topk_distance"] = np.where(
        empty, np.inf, np.take_along_axis(dist, sel, axis=1)).astype(np.float32)
  return results


def _stream_setup(q_pids, q_camids, max_rank, ap, topk, mesh):
  if ap not in AP_MODES:
    raise ValueError(f"ap = {ap!r}: expected one of {', '.join(AP_MODES)}")
  if int(max_rank) < 1:
    raise ValueError(f"max_rank = {max_rank}: expected >= 1")
  if int(topk) < 0:
    raise ValueError(f"topk = {topk}: expected >= 0")
  qp = _check_ids("q_pids", q_pids, None, "")
  qc = _check_ids("q_camids", q_camids, qp.size, "")
  if mesh is None:
    from stmn_jax import sharding  # pylint: disable=g-import-not-at-top

    from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top

    devices = jax.local_devices()  # all devices with one process
    mesh = jax.make_mesh((len(devices),), (sharding.DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)
  if not all(d.process_index == jax.process_index() for d in mesh.devices.flat):
    raise ValueError("mesh: the streamed ranking runs in one process; give a mesh of this "
                     "process's devices (e.g. sharding.make_mesh over jax.local_devices())")
  return qp, qc, mesh


def _gallery_rows(gallery: Any, axis: int) -> int | None:
  return int(gallery[0].shape[axis]) if _is_array_triple(gallery) else None


def rank_streaming(
    query_feats: Any,
    q_pids: Any,
    q_camids: Any,
    gallery: Any,
    *,
    metric: str = "cosine",
    max_rank: int = 20,
    ap: str = "noninterp",
    gallery_chunk: int | None = None,
    topk: int = 0,
    mesh: Any = None,
) -> dict:
  """Exact CMC / mAP / mINP of features, streaming the gallery: memory O(Q x gallery_chunk)
  plus O(U x D) for the U gallery items that are some query's true match (U <= Q x max
  matches) plus O(Q x (max matches + topk)), never O(Q x G).

  query_feats (Q, D), q_pids, q_camids (Q,). `gallery` is (feats (G, D), pids (G,), camids (G,))
  arrays (an `np.memmap` / `np.load(mmap_mode="r")` is read chunk by chunk), a list of such
  chunks, or a function returning a fresh iterator of chunks; the gallery's order is the
  chunks' concatenation. It is read twice, distances are computed once (`_rank_stream`): a scan
  finds the (query, true match) pairs from the pids and copies the U match rows; those are
  ranked in blocks of their own (which give each pair's own distance); then every chunk is
  ranked once, with its match rows masked out, counting per pair the ranked items before the
  match (smaller distance, or equal and lower gallery index; junk and same-pid same-camera
  items excluded). Every comparison thus sees the one float32 value computed for a (query,
  item): the ranking is exact for those values. Chunks of `gallery_chunk` rows (None: ~2^24 / Q
  in [1024, 65536], evened out over a gallery of arrays; rounded up to a multiple of the number
  of devices; the last one padded) are split over the devices of `mesh` (default: this
  process's devices, 'data' axis). The distances come from `pairwise_distance`'s kernel, so results equal
  `rank(pairwise_distance(q, g, metric), ...)` whenever both compute the same float32 values
  (always for exactly representable dot products; with general features a different block
  shape may change a last bit, and with it the order of two items closer than that).

  Returns `rank`'s dict plus "num_gallery", and with topk > 0 "topk_index" (Q, topk) int64 and
  "topk_distance" (Q, topk) float32: each query's topk nearest ranked gallery items (junk and
  same-pid same-camera items excluded; ties by gallery index; -1 / inf when fewer). CMC comes
  from the counts (position of the first true match), not from the top-k.
  """
  if metric not in METRICS:
    raise ValueError(f"distance metric {metric!r}: expected one of {', '.join(METRICS)}")
  qp, qc, mesh = _stream_setup(q_pids, q_camids, max_rank, ap, topk, mesh)
  q = np.asarray(query_feats)
  if q.ndim != 2 or q.shape[0] != qp.size:
    raise ValueError(f"query_feats: expected ({qp.size}, D) to match q_pids, got {q.shape}")
  q = q.astype(np.float32)
  if not np.isfinite(q).all():
    rows = np.flatnonzero(~np.isfinite(q).all(axis=1))
    raise ValueError(f"query_feats: non-finite values in {rows.size} row(s), first: "
                     f"{rows[:10].tolist()}")
  chunk = _chunk_rows(gallery_chunk, qp.size, mesh.size, _gallery_rows(gallery, 0))
  return _rank_stream(
      _source(gallery, 0, chunk), q, qp, qc, metric=metric, other=q.shape[1], chunk=chunk,
      max_rank=int(max_rank), ap=ap, topk=int(topk), mesh=mesh, what="gallery")


def rank_distance_blocks(
    blocks: Any,
    q_pids: Any,
    q_camids: Any,
    *,
    max_rank: int = 20,
    ap: str = "noninterp",
    gallery_chunk: int | None = None,
    topk: int = 0,
    mesh: Any = None,
) -> dict:
  """`rank_streaming` from precomputed distances: `blocks` is (distmat (Q, G), g_pids,
  g_camids) arrays (memmap allowed), a list of (dist (Q, n), pids (n,), camids (n,)) column
  blocks, or a function returning a fresh iterator of them. Same counting code as
  `rank_streaming`; the result equals `rank(distmat, ...)` exactly (+-inf allowed, NaN refused).
  """
  qp, qc, mesh = _stream_setup(q_pids, q_camids, max_rank, ap, topk, mesh)
  chunk = _chunk_rows(gallery_chunk, qp.size, mesh.size, _gallery_rows(blocks, 1))
  return _rank_stream(
      _source(blocks, 1, chunk), None, qp, qc, metric=None, other=qp.size, chunk=chunk,
      max_rank=int(max_rank), ap=ap, topk=int(topk), mesh=mesh, what="distance blocks")


# ------------------------------------------------------------------------------ pooling
@functools.partial(jax.jit, static_argnames=("num_tracklets",))
def _pool(emb: jax.Array, seg: jax.Array, num_tracklets: int):
  """(N, D), (N,) in [0, T] (T: padding, dropped) -> sums (T, D), clip counts (T,)."""
  sums = jax.ops.segment_sum(emb, seg, num_segments=num_tracklets + 1)
  counts = jax.ops.segment_sum(jnp.ones_like(seg, jnp.float32), seg, num_segments=num_tracklets + 1)
  return sums[:num_tracklets], counts[:num_tracklets]


def pool_clips(
    clip_embeddings: Any, tracklet_index: Any, mask: Any, num_tracklets: int
) -> np.ndarray:
  """(Nc, D) clip embeddings, (Nc,) tracklet index, (Nc,) bool mask -> (T, D) float32 means.

  Each tracklet's feature is the mean of its valid (mask True) clips. Padding rows (mask False)
  are ignored whatever their index. Raises ValueError when a valid row's index is outside
  [0, T) or when a tracklet got no valid clip.
  """
  emb = np.asarray(clip_embeddings, np.float32)
  index = np.asarray(tracklet_index)
  mask = np.asarray(mask).astype(bool)
  if emb.ndim != 2 or index.shape != (emb.shape[0],) or mask.shape != (emb.shape[0],):
    raise ValueError(
        f"pool_clips: expected clip_embeddings (N, D), tracklet_index (N,), mask (N,); got "
        f"{emb.shape}, {index.shape}, {mask.shape}"
    )
  bad = mask & ((index < 0) | (index >= num_tracklets))
  if bad.any():
    raise ValueError(
        f"pool_clips: tracklet_index {index[bad][:5].tolist()} of valid clips outside "
        f"[0, {num_tracklets})"
    )
  seg = np.where(mask, index, num_tracklets).astype(np.int32)
  sums, counts = _pool(emb, seg, num_tracklets)
  counts = np.asarray(counts)
  missing = np.flatnonzero(counts == 0)
  if missing.size:
    raise ValueError(
        f"pool_clips: {missing.size} of {num_tracklets} tracklets got no valid clip "
        f"(first: {missing[:10].tolist()})"
    )
  return np.asarray(sums) / counts[:, None]


def _to_host(x: Any, local_rows: int) -> np.ndarray:
  """A batch output -> host NumPy rows of the global batch (see `extract_features`)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  x = np.asarray(x)
  if jax.process_count() > 1 and x.shape[0] == local_rows:
    x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return x


def extract_features(
    embed_fn: Callable[[Any], Any], batches: Iterable[Mapping[str, Any]], num_tracklets: int
) -> np.ndarray:
  """Runs `embed_fn(frames) -> (B, D)` over eval batches and pools clips per tracklet -> (T, D).

  `batches` yields host-local {"frames" (B, L, H, W, 3), "mask" (B,), "tracklet_index" (B,)}
  (docs/ARCHITECTURE.md). `embed_fn` may return a dict with an "embedding" key, a host array,
  or a (possibly sharded) jax.Array; flip averaging, if any, belongs in `embed_fn`.

  Multi-host: every host yields the same number of batches and each tracklet's clips appear once
  over all hosts. An output that is a global jax.Array not fully addressable here is gathered
  with `multihost_utils.process_allgather(tiled=True)`; the host-local `mask` and
  `tracklet_index` (and a host-local output) are gathered the same way, which concatenates the
  hosts' rows in process order, the layout of `jax.make_array_from_process_local_data` on a
  'data' mesh. Every host then pools the same global rows. With one process nothing is gathered.
  """
  embs, indices, masks = [], [], []
  for batch in batches:
    for key in ("frames", "mask", "tracklet_index"):
      if key not in batch:
        raise ValueError(f"extract_features: eval batch without {key!r} (has {sorted(batch)})")
    local_rows = np.asarray(batch["mask"]).shape[0]
    out = embed_fn(batch["frames"])
    if isinstance(out, Mapping):
      out = out["embedding"]
    emb = _to_host(out, local_rows)
    index = np.asarray(batch["tracklet_index"])
    mask = np.asarray(batch["mask"]).astype(bool)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      index = np.asarray(multihost_utils.process_allgather(index, tiled=True))
      mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True))
    if emb.shape[0] != index.shape[0]:
      raise ValueError(f"extract_features: embed_fn returned {emb.shape[0]} rows for a batch of "
                       f"{index.shape[0]} clips")
    embs.append(emb.reshape(emb.shape[0], -1))
    indices.append(index)
    masks.append(mask)
  if not embs:
    raise ValueError("extract_features: no eval batches")
  return pool_clips(
      np.concatenate(embs), np.concatenate(indices), np.concatenate(masks), num_tracklets
  )


# ------------------------------------------------------------------------------ re-ranking
def _nearest(dist: np.ndarray, k: int) -> np.ndarray:
  """(N, N) -> (N, k) indices of each row's k smallest values, ties by index (stable)."""
  n = dist.shape[0]
  k = min(k, dist.shape[1])
  out = np.empty((n, k), np.int64)
  for i in range(n):
    row = dist[i]
    if k < row.size:
      kth = row[np.argpartition(row, k - 1)[k - 1]]
      cand = np.flatnonzero(row <= kth)
    else:
      cand = np.arange(row.size)
    out[i] = cand[np.argsort(row[cand], kind="stable")[:k]]
  return out


def _reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
  """k-reciprocal neighbours of i: j in i's top k+1 that has i in its own top k+1."""
  forward = initial_rank[i, :k + 1]
  return forward[(initial_rank[forward, :k + 1] == i).any(axis=1)]


def re_ranking(
    q_g: Any, q_q: Any, g_g: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
  """k-reciprocal re-ranking (Zhong et al., CVPR 2017) -> (Q, G) float32 distances.

  Follows the authors' released procedure: the joint (Q+G)^2 distances are squared and each
  column divided by its maximum (then transposed, as their code does); every item's k1-reciprocal
  set is expanded by the k1/2-reciprocal sets of its members that share more than 2/3 of it;
  Gaussian weights exp(-d) normalised to sum 1 form sparse vectors V; with k2 > 1 each V is
  replaced by the mean of its k2 nearest neighbours' V (query expansion); the Jaccard distance
  1 - sum(min) / sum(max) between query and gallery V is mixed as
  lambda * original + (1 - lambda) * jaccard. Neighbours are ranked with a stable order (ties by
  index). NumPy + scipy.sparse; memory O((Q+G)^2) for the joint distance matrix.
  """
  from scipy import sparse  # pylint: disable=g-import-not-at-top

  q_g = np.asarray(q_g, np.float32)
  q_q = np.asarray(q_q, np.float32)
  g_g = np.asarray(g_g, np.float32)
  nq, ng = q_g.shape
  if q_q.shape != (nq, nq) or g_g.shape != (ng, ng):
    raise ValueError(f"re_ranking: expected q_q ({nq}, {nq}) and g_g ({ng}, {ng}) for q_g "
                     f"{q_g.shape}, got {q_q.shape} and {g_g.shape}")
  if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f"re_ranking: k1={k1}, k2={k2} >= 1 and lambda_value={lambda_value} in "
                     "[0, 1] expected")
  n = nq + ng
  dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32) ** 2
  dist = (dist / np.maximum(dist.max(axis=0), np.finfo(np.float32).tiny)).T
  half = int(np.around(k1 / 2.0))
  initial_rank = _nearest(dist, max(k1 + 1, k2))

  rows, cols, vals = [], [], []
  for i in range(n):
    recip = _reciprocal(initial_rank, i, k1)
    expansion = [recip]
    for c in recip:
      cand = _reciprocal(initial_rank, int(c), half)
      if np.intersect1d(cand, recip).size > 2.0 / 3.0 * cand.size:
        expansion.append(cand)
    members = np.unique(np.concatenate(expansion))
    weight = np.exp(-dist[i, members].astype(np.float64))
    rows.append(np.full(members.size, i))
    cols.append(members)
    vals.append(weight / weight.sum())
  v = sparse.csr_matrix(
      (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
  )
  if k2 != 1:
    expand = sparse.csr_matrix(
        (np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), initial_rank[:, :k2].ravel())),
        shape=(n, n),
    )
    v = (expand @ v).tocsr()
  v_gallery = v[nq:].tocsc()
  shared = np.zeros((nq, ng))
  for i in range(nq):
    row = v.getrow(i)
    sub = v_gallery[:, row.indices].tocsc()
    sub.data = np.minimum(sub.data, np.repeat(row.data, np.diff(sub.indptr)))
    shared[i] = np.asarray(sub.sum(axis=1)).ravel()
  jaccard = 1.0 - shared / (2.0 - shared)
  final = jaccard * (1.0 - lambda_value) + dist[:nq, nq:] * lambda_value
  return final.astype(np.float32)


# ------------------------------------------------------------------------------ evaluate
def evaluate(
    q_feats: Any,
    g_feats: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    distance: str = "cosine",
    rerank: bool = False,
    ap: str = "noninterp",
    max_rank: int = 20,
) -> dict:
  """Features -> `rank`'s dict plus "R1", "R5", "R10", "R20" (those <= max_rank), fractions."""
  q_g = pairwise_distance(q_feats, g_feats, distance)
  if rerank:
    q_g = re_ranking(
        q_g, pairwise_distance(q_feats, q_feats, distance),
        pairwise_distance(g_feats, g_feats, distance),
    )
  results = rank(q_g, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, ap=ap)
  for k in TABLE_RANKS:
    if k <= max_rank:
      results[f"R{k}"] = float(results["cmc"][k - 1])
  return results


def format_table(results: Mapping[str, Any]) -> str:
  """One header line and one row: R1 R5 R10 R20 mAP mINP in %, valid / all queries."""
  cmc = np.asarray(results["cmc"])
  names, values = [], []
  for k in TABLE_RANKS:
    if k <= cmc.size:
      names.append(f"R{k}")
      values.append(f"{100.0 * cmc[k - 1]:.2f}")
  names += ["mAP", "mINP", "queries"]
  valid = int(results["num_valid_queries"])
  total = valid + int(results.get("num_queries_without_match", 0))
  values += [f"{100.0 * results['mAP']:.2f}", f"{100.0 * results['mINP']:.2f}", f"{valid}/{total}"]
  widths = [max(len(a), len(b)) for a, b in zip(names, values)]
  return "\n".join(
      "  ".join(s.rjust(w) for s, w in zip(line, widths)) for line in (names, values)
  )


def json_ready(results: Mapping[str, Any]) -> dict:
  """NumPy values -> plain Python (lists, floats, ints) for json.dumps."""
  out = {}
  for k, v in results.items():
    if isinstance(v, np.ndarray):
      v = v.tolist()
    elif isinstance(v, (np.floating, np.integer, np.bool_)):
      v = v.item()
    out[k] = v
  return out


# ------------------------------------------------------------------------------ CLI
def load_features(path: str) -> dict[str, np.ndarray]:
  """The six arrays of a features .npz (no pickle); a missing key names the key and the file."""
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in NPZ_KEYS if k not in data.files]
      if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)} (expected "
                         f"{', '.join(NPZ_KEYS)}; found {', '.join(data.files) or 'none'})")
      out = {k: data[k] for k in NPZ_KEYS}
  except (OSError, ValueError) as e:
    if isinstance(e, ValueError) and str(e).startswith(f"{path}:"):
      raise
    raise ValueError(f"{path}: cannot read as a .npz of arrays without pickle: {e}") from e
  for k in ("q_feats", "g_feats"):
    if out[k].ndim != 2:
      raise ValueError(f"{path}: {k} must be 2-D (N, D), got shape {out[k].shape}")
  for k, feats in (("q_pids", "q_feats"), ("q_camids", "q_feats"),
                   ("g_pids", "g_feats"), ("g_camids", "g_feats")):
    if out[k].shape != (out[feats].shape[0],):
      raise ValueError(f"{path}: {k} must have shape ({out[feats].shape[0]},) like {feats}, got "
                       f"{out[k].shape}")
  return out


def load_extracted(npy_path: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Features written by `main.py --mode=extract`: `X.npy` (T, D) and its index `X.csv`
  (columns `pid`, `camera`, one row per feature row) -> (feats, pids, camids). mmap: the
  features as a read-only memory map (`np.load(mmap_mode="r")`), read when used."""
  csv_path = os.path.splitext(npy_path)[0] + ".csv"
  try:
    feats = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{npy_path}: cannot read as a .npy array without pickle: {e}") from e
  if feats.ndim != 2:
    raise ValueError(f"{npy_path}: expected features (T, D), got shape {feats.shape}")
  if not os.path.isfile(csv_path):
    raise ValueError(f"{csv_path}: missing: the index CSV written beside {npy_path} by "
                     "--mode=extract (columns pid, camera)")
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  for column in ("pid", "camera"):
    if rows and column not in rows[0]:
      raise ValueError(f"{csv_path}: no {column!r} column (found {', '.join(rows[0])})")
  if len(rows) != feats.shape[0]:
    raise ValueError(f"{csv_path}: {len(rows)} rows but {npy_path} has {feats.shape[0]} features")
  try:
    pids = np.asarray([int(r["pid"]) for r in rows], np.int64)
    camids = np.asarray([int(r["camera"]) for r in rows], np.int64)
  except ValueError as e:
    raise ValueError(f"{csv_path}: pid and camera must be integers: {e}") from e
  return feats, pids, camids


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m stmn_jax.evaluation --features=FILE.npz [...]` or `--query=Q.npy --gallery=G.npy`
  (features from `main.py --mode=extract`); defaults: configs/default.py."""
  from configs import default  # pylint: disable=g-import-not-at-top

  e = default.get_config().eval
  parser = argparse.ArgumentParser(
      prog="python -m stmn_jax.evaluation",
      description="CMC / mAP / mINP of saved query and gallery features "
                  f"(npz keys: {' '.join(NPZ_KEYS)}).",
  )
  parser.add_argument("--features", help="the .npz file")
  parser.add_argument("--query", help="query features .npy from --mode=extract (with its .csv)")
  parser.add_argument("--gallery", help="gallery features .npy from --mode=extract (with its .csv)")
  parser.add_argument("--distance", default=e.distance, choices=METRICS)
  parser.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=e.rerank)
  parser.add_argument("--ap", default=e.ap, choices=AP_MODES)
  parser.add_argument("--max_rank", type=int, default=e.max_rank)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                      help="rank with rank_streaming (gallery in chunks, memory-mapped .npy); "
                           "default: when the gallery has more than --stream_above items")
  parser.add_argument("--stream_above", type=int, default=STREAM_ABOVE,
                      help="gallery size above which the ranking streams (without --rerank)")
  parser.add_argument("--gallery_chunk", type=int, default=None,
                      help="gallery rows per streamed chunk (default: rank_streaming's)")
  args = parser.parse_args(argv)
  if bool(args.features) == bool(args.query and args.gallery) or (
      bool(args.query) != bool(args.gallery)):
    parser.error("give either --features=F.npz or both --query=Q.npy and --gallery=G.npy")
  if args.stream and args.rerank:
    print("error: --stream cannot be combined with --rerank (re-ranking needs the (G, G) "
          "gallery distances in memory)", file=sys.stderr)
    return 2
  try:
    if args.features:
      data = load_features(args.features)
    else:
      data = {}
      for side, path in (("q", args.query), ("g", args.gallery)):
        data[f"{side}_feats"], data[f"{side}_pids"], data[f"{side}_camids"] = (
            load_extracted(path, mmap=side == "g"))
    stream = args.stream
    if stream is None:
      stream = not args.rerank and data["g_feats"].shape[0] > args.stream_above
    if stream:
      results = rank_streaming(
          data["q_feats"], data["q_pids"], data["q_camids"],
          (data["g_feats"], data["g_pids"], data["g_camids"]), metric=args.distance,
          max_rank=args.max_rank, ap=args.ap, gallery_chunk=args.gallery_chunk)
      for k in TABLE_RANKS:
        if k <= args.max_rank:
          results[f"R{k}"] = float(results["cmc"][k - 1])
      results["streamed"] = True
    else:
      results = evaluate(
          data["q_feats"], data["g_feats"], data["q_pids"], data["g_pids"],
          data["q_camids"], data["g_camids"], distance=args.distance, rerank=args.rerank,
          ap=args.ap, max_rank=args.max_rank,
      )
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if args.json:
    out = json_ready(results)
    out.update(distance=args.distance, rerank=args.rerank, ap=args.ap,
               features=args.features or [args.query, args.gallery])
    print(json.dumps(out))
  else:
    print(format_table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
