"""Streamed exact ranking: `rank`'s numbers without a (Q, G) matrix.

`rank_streaming` (features) and `rank_distance_blocks` (precomputed distances) read the gallery
in chunks (arrays, memory maps or a chunk generator) and accumulate the same per-(query, true
match) counts as `rank` chunk by chunk, on a device mesh ('data' axis, shard_map).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from stmn_jax import sharding
from stmn_jax.ranking.distances import METRICS, _distance_block, pairwise_distance
from stmn_jax.ranking.exact import AP_MODES, _ROWS_PER_STEP, _results_from_positions, _round_up

# Default gallery chunk: about this many (query, gallery) distances per block (64 MB float32),
# clipped to [_STREAM_MIN_CHUNK, _STREAM_MAX_CHUNK] gallery rows.
_STREAM_BLOCK_ELEMENTS = 1 << 24
_STREAM_MIN_CHUNK, _STREAM_MAX_CHUNK = 1024, 65536
# The (query, match) pairs of one match block are padded to a power of two, at least this.
_STREAM_MIN_PAIRS = 128
_INT32 = np.iinfo(np.int32)
# `python -m stmn_jax.evaluation --query --gallery` streams galleries above this many rows.

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
  process's devices, 'data' axis). The distances come from `pairwise_distance`'s kernel, so
  results equal `rank(pairwise_distance(q, g, metric), ...)` whenever both compute the same
  float32 values (always for exactly representable dot products; with general features a
  different block shape may change a last bit, and with it the order of two items closer than
  that).

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
