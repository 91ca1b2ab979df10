"""`--mode=search`: rank saved gallery embeddings for the tracklet folders of a query folder.

`python main.py --mode=search --workdir=W --config=... --query=DIR --gallery=FEATURES.npy
[--topk=10]`. The query folder is read and embedded exactly as `--mode=extract --input_dir`
does (`data_pipelines.folders`, `inference.embed_tracklets`); the gallery is a
`W/features/<name>.npy` (G, D) written by extract with its sibling `<name>.csv` index
(`features_io`). Distances follow `config.eval.distance`. Writes `W/search/results.json` and
one ranked-list picture per query, `W/search/<query>.png`. The workdir and the gallery file may
be local or `gs://...` (`workdir_io`).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from data_pipelines import folders
from stmn_jax import errors
from stmn_jax import features_io
from stmn_jax import figures
from stmn_jax import inference
from stmn_jax import ranking
from stmn_jax import run_setup
from stmn_jax import workdir_io

DEFAULT_TOPK = 10


def search_dir(workdir: str) -> str:
  return str(workdir_io.workdir_path(workdir) / "search")


def top_k(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(Q, G) distances -> (Q, k') gallery indices and distances, nearest first; k' = min(k, G).

  Ties keep gallery order (stable sort).
  """
  if k < 1:
    raise errors.ConfigError(f"--topk={k}: expected >= 1")
  k = min(k, dist.shape[1])
  order = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(dist, order, axis=1)


def _png_name(name: str) -> str:
  return name.replace(os.sep, "_").replace("/", "_") + ".png"


def search_mode(
    config: ml_collections.ConfigDict, workdir: str, query: str | None = None,
    gallery: str | None = None, topk: int = DEFAULT_TOPK,
) -> dict:
  """Embeds the tracklet folders of `query`, ranks the `gallery` embeddings by
  `config.eval.distance`, prints the top-k of each query and writes `W/search/results.json`
  plus `W/search/<query>.png`."""
  if not query or not gallery:
    raise errors.ConfigError("--mode=search needs --query=DIR (tracklet folders) and "
                     "--gallery=FEATURES.npy (from --mode=extract)")
  if topk < 1:
    raise errors.ConfigError(f"--topk={topk}: expected >= 1")
  try:
    g_feats, g_rows = features_io.read_features(gallery)
  except (OSError, ValueError) as e:  # the file's own message, with the flag that named it
    raise type(e)(f"--gallery={gallery}: {e}") from e
  names, tracklets = folders.read_folder(query, flag="--query")
  config = run_setup.with_files_source(config)
  run = inference.prepare(config, workdir, read_data=False)
  ckpt_label = run.checkpoint
  q_feats = inference.embed_tracklets(run.state, tracklets, config, run.mesh, progress=True)
  if q_feats.shape[1] != g_feats.shape[1]:
    raise errors.ConfigError(f"--gallery={gallery}: {g_feats.shape[1]}-d embeddings but the model "
                     f"gives {q_feats.shape[1]}-d ones")
  metric = config.eval.distance
  dist = ranking.pairwise_distance(q_feats, g_feats, metric)
  order, top = top_k(dist, topk)
  out_dir = workdir_io.workdir_path(workdir) / "search"
  results = []
  lines = [f"\nSearch ({metric} distance, {ckpt_label}): {len(names)} queries against "
           f"{len(g_rows)} gallery tracklets of {gallery}"]
  write = jax.process_index() == 0
  if write:
    out_dir.mkdir(parents=True, exist_ok=True)
  for qi, (name, t) in enumerate(zip(names, tracklets)):
    matches = [dict(rank=r + 1, **{k: g_rows[gi][k] for k in ("tracklet", "pid", "camera",
                                                                "first_frame")},
                    distance=float(top[qi, r]))
               for r, gi in enumerate(order[qi])]
    png = str(out_dir / _png_name(name))
    if write:
      figures.ranked_list_png(png, t.frames[0], t.pid, matches, config.data.height, config.data.width)
    results.append({"query": name, "pid": t.pid, "camera": t.camid, "picture": png,
                    "matches": matches})
    lines.append(f"query {name} (pid {t.pid}, camera {t.camid}):")
    lines += [f"  {m['rank']:3d}  {m['tracklet']:<24s} pid {m['pid']:>5d}  camera "
              f"{m['camera']:>3d}  distance {m['distance']:.4f}" for m in matches]
  summary = {"mode": "search", "checkpoint": ckpt_label, "query_dir": os.path.abspath(query),
             "gallery": str(workdir_io.workdir_path(gallery)), "metric": metric,
             "topk": int(order.shape[1]), "results": results}
  path = str(out_dir / "results.json")
  if write:
    workdir_io.write_text_atomic(path, json.dumps(summary, indent=1))
  lines.append(f"  -> {path}")
  print("\n".join(lines), flush=True)
  return {**summary, "results_json": path}
