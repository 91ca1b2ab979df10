"""Ranked lists on disk in torchreid's video layout (`visrank/`), and the ranking they show.

`export_visrank` writes what torchreid's `visualize_ranked_results` writes for video data;
`ranked_gallery` is the per-query order both it and the ranked-list figures use. The folder
may be local or in an object store (`gs://...`): it is written through `etils.epath`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from etils import epath


def ranked_gallery(dist: np.ndarray, q_pid: int, q_cam: int, g_pids: np.ndarray,
                   g_cams: np.ndarray, k: int) -> np.ndarray:
  """(G,) distances of one query -> indices of its k nearest gallery tracklets, leaving out
  the same identity seen by the same camera (as the evaluation and torchreid do); ties keep
  gallery order."""
  order = np.argsort(dist, kind="stable")
  keep = ~((g_pids[order] == q_pid) & (g_cams[order] == q_cam))
  return order[keep][:k]


def _copy_frames(frames: Sequence[str], dst: epath.Path) -> None:
  """Copies the frame files (dataset files) into the folder `dst`, keeping their names."""
  dst.mkdir(parents=True, exist_ok=True)
  for f in frames:
    epath.Path(f).copy(dst / os.path.basename(f), overwrite=True)


def export_visrank(save_dir: str, dist: np.ndarray, query: Sequence[Any], gallery: Sequence[Any],
                   topk: int, num_queries: int = -1) -> list[str]:
  """Ranked lists in the folder layout of torchreid's `visualize_ranked_results` for video
  data (KaiyangZhou/deep-person-reid, torchreid/utils/reidtools.py): per query a folder named
  after its first frame without extension, holding `query_top000/` (the query's frames) and
  `gallery_top001_TRUE/` or `..._FALSE/` ... up to `topk` (copies of each gallery tracklet's
  frames; TRUE when the pids match). Gallery tracklets of the query's pid and camera are
  skipped, as there. Differences: ties keep gallery order (stable sort), `save_dir` is emptied
  first, and only the first `num_queries` queries are written (-1: all). torchreid's
  `width` / `height` resize only its image-data grid, so they have no counterpart here.

  dist (Q, G). Returns the query folders written.
  """
  root = epath.Path(save_dir)
  if root.is_dir():
    root.rmtree()
  root.mkdir(parents=True)
  g_pids = np.asarray([g.pid for g in gallery])
  g_cams = np.asarray([g.camid for g in gallery])
  n = len(query) if num_queries < 0 else min(num_queries, len(query))
  written = []
  for qi in range(n):
    q = query[qi]
    qdir = root / os.path.splitext(os.path.basename(q.frames[0]))[0]
    _copy_frames(q.frames, qdir / "query_top000")
    for rank, gi in enumerate(ranked_gallery(dist[qi], q.pid, q.camid, g_pids, g_cams, topk), 1):
      g = gallery[gi]
      suffix = "TRUE" if g.pid == q.pid else "FALSE"
      _copy_frames(g.frames, qdir / f"gallery_top{rank:03d}_{suffix}")
    written.append(str(qdir))
  return written
