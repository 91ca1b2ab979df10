"""Retrieval ranking: distances, exact and streamed CMC / mAP / mINP, re-ranking, CLI.

- `distances`: `pairwise_distance` (cosine, euclidean, sqeuclidean; `METRICS`);
- `exact`: `rank` (jitted, no sort; the protocol is in its docstring) and `rank_reference`
  (the per-query NumPy loop), `AP_MODES`;
- `streaming`: `rank_streaming` / `rank_distance_blocks`, the same numbers with the gallery
  read in chunks over a device mesh;
- `rerank`: k-reciprocal `re_ranking`;
- `metrics`: `evaluate` (features -> metrics), `format_table`, `json_ready`, `TABLE_RANKS`;
- `cli`: `python -m stmn_jax.ranking` (`main`, `CLI_DEFAULTS`, `STREAM_ABOVE`, the .npz
  reader `load_features`).
"""

from __future__ import annotations

from stmn_jax.ranking import cli, distances, exact, metrics, rerank, streaming
from stmn_jax.ranking.cli import CLI_DEFAULTS, NPZ_KEYS, STREAM_ABOVE, load_features
from stmn_jax.ranking.distances import METRICS, pairwise_distance
from stmn_jax.ranking.exact import AP_MODES, rank, rank_reference
from stmn_jax.ranking.metrics import (
    TABLE_RANKS, add_table_ranks, evaluate, format_table, json_ready)
from stmn_jax.ranking.rerank import re_ranking
from stmn_jax.ranking.streaming import rank_distance_blocks, rank_streaming

__all__ = [
    "AP_MODES", "CLI_DEFAULTS", "METRICS", "NPZ_KEYS", "STREAM_ABOVE", "TABLE_RANKS",
    "add_table_ranks", "cli", "distances", "evaluate", "exact", "format_table", "json_ready",
    "load_features", "metrics", "pairwise_distance", "rank", "rank_distance_blocks",
    "rank_reference", "rank_streaming", "re_ranking", "rerank", "streaming",
]
