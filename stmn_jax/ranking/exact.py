"""Exact CMC / mAP / mINP of a (Q, G) distance matrix, without sorting a gallery row.

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
`rank_reference` is the per-query NumPy loop that `rank` is checked against.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stmn_jax.ranking.distances import _to_device

AP_MODES = ("noninterp", "matlab")

# (query, match) pairs per step of the kernel's inner loop: keeps the compare block small
# enough to stay in cache (blocks of tens of MB made XLA:CPU 20-30x slower per element).
_ROWS_PER_STEP = 16


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
  (P,) query row and gallery column of a true match; pair_removed (P, S) the query's same-pid
  same-camera gallery columns, the first pair_num_removed (P,) real -> (P,) int32. Position =
  number of items before the match (smaller distance, or equal and lower column) minus the
  removed items among them. P must be a multiple of rows_per_step; rows are processed
  rows_per_step at a time (lax.map), so the compare block stays small.
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
