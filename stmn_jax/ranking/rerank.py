"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances."""

from __future__ import annotations

from typing import Any

import numpy as np


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
