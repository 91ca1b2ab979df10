"""Clip embeddings -> per-tracklet features: the mean over each tracklet's valid clips.

`extract_features` runs an embedding function over eval batches (docs/ARCHITECTURE.md) and
`pool_clips` averages the clips of each tracklet. JAX and NumPy only (no TensorFlow).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


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
