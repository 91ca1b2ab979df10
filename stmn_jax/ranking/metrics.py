"""Features -> retrieval metrics in one call (`evaluate`), and their table / JSON forms."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from stmn_jax.ranking.distances import pairwise_distance
from stmn_jax.ranking.exact import rank
from stmn_jax.ranking.rerank import re_ranking

TABLE_RANKS = (1, 5, 10, 20)


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
  return add_table_ranks(results, max_rank)


def add_table_ranks(results: dict, max_rank: int) -> dict:
  """Adds "R1", "R5", "R10", "R20" (those <= max_rank) from results["cmc"]; returns results."""
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


def json_ready(x: Any) -> Any:
  """NumPy values, tuples and nested dicts -> plain Python (lists, floats, ints) for json."""
  if isinstance(x, Mapping):
    return {str(k): json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_ready(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  return x
