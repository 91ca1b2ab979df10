"""Compatibility module: the code now lives in `stmn_jax.ranking`, `stmn_jax.pooling` and
`stmn_jax.features_io`. Old imports and `python -m stmn_jax.evaluation ...` keep working."""

from __future__ import annotations

import sys
from typing import Sequence

from stmn_jax.features_io import read_arrays as load_extracted
from stmn_jax.pooling import extract_features, pool_clips
from stmn_jax.ranking import (
    AP_MODES, METRICS, NPZ_KEYS, STREAM_ABOVE, TABLE_RANKS, evaluate, format_table, json_ready,
    load_features, pairwise_distance, rank, rank_distance_blocks, rank_reference,
    rank_streaming, re_ranking)
from stmn_jax.ranking.cli import main as _main

__all__ = [
    "AP_MODES", "METRICS", "NPZ_KEYS", "STREAM_ABOVE", "TABLE_RANKS", "evaluate",
    "extract_features", "format_table", "json_ready", "load_extracted", "load_features", "main",
    "pairwise_distance", "pool_clips", "rank", "rank_distance_blocks", "rank_reference",
    "rank_streaming", "re_ranking",
]


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m stmn_jax.evaluation ...`: `stmn_jax.ranking.cli.main` under the old name."""
  return _main(argv, prog="python -m stmn_jax.evaluation")


if __name__ == "__main__":
  sys.exit(main())
