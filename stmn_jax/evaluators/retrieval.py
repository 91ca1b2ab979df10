"""Retrieval evaluator: embed query and gallery tracklets, rank, CMC / mAP / mINP.

Each distinct tracklet is embedded once (`inference.embed_tracklets`, under
`config.eval.sampling`), then `ranking.evaluate` scores the queries against the gallery with
`config.eval.distance`, `rerank`, `ap` and `max_rank`.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipelines import tracklets as tracklets_lib
from stmn_jax import inference
from stmn_jax import ranking


class Evaluator:
  """`run(state, query, gallery) -> ranking.evaluate's dict` (R1, R5, ..., mAP, mINP)."""

  def __init__(self, state: Any, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config, self.mesh = config, mesh
    # Compiled once, and fails here (before any training) for "whole" on a model without it.
    self.embedder = inference.make_embedder(state, config, mesh)

  def run(self, state: Any, query: Sequence[Any], gallery: Sequence[Any]) -> dict:
    unique: dict[Any, int] = {}
    for t in list(query) + list(gallery):
      unique.setdefault(t, len(unique))
    feats = inference.embed_tracklets(state, list(unique), self.config, self.mesh,
                                      self.embedder)
    q_idx = np.asarray([unique[t] for t in query], np.int64)
    g_idx = np.asarray([unique[t] for t in gallery], np.int64)
    q, g = tracklets_lib.arrays(query), tracklets_lib.arrays(gallery)
    e = self.config.eval
    return ranking.evaluate(
        feats[q_idx], feats[g_idx], q["pid"], g["pid"], q["camid"], g["camid"],
        distance=e.distance, rerank=e.rerank, ap=e.ap, max_rank=e.max_rank,
    )
