"""--mode=search: rank saved gallery embeddings for the tracklet folders of a query folder.

`python main.py --mode=search --workdir=W --config=... --query=DIR --gallery=FEATURES.npy
[--topk=10]`. The query folder is read and embedded exactly as `--mode=extract --input_dir`
does (`export.read_folder`, `export.embed_tracklets`); the gallery is a `W/features/<name>.npy`
(G, D) written by extract together with its sibling `<name>.csv` index. Distances follow
`config.eval.distance`. Writes `W/search/results.json` and one ranked-list picture per query,
`W/search/<query>.png`.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from stmn_jax import app
from stmn_jax import export
from stmn_jax import sharding

DEFAULT_TOPK = 10
GREY = 128  # tile value of a gallery entry whose first frame is not on disk
MATCH_COLOR, MISMATCH_COLOR = "tab:green", "tab:red"


def search_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "search")


def load_gallery(path: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """`FEATURES.npy` (G, D) and its sibling `FEATURES.csv` -> (features, index rows).

  Rows are dicts with tracklet (str), pid, camera, num_frames (int) and first_frame (str).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--gallery={path}: no such file (expected a .npy of --mode=extract)")
  try:
    feats = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"--gallery={path}: not a plain .npy array: {e}") from e
  if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
    raise ValueError(f"--gallery={path}: expected a (G, D) float array, got {feats.dtype} "
                     f"{feats.shape}")
  index = os.path.splitext(path)[0] + ".csv"
  if not os.path.isfile(index):
    raise FileNotFoundError(f"{index}: missing gallery index (the .csv written next to {path} "
                            "by --mode=extract)")
  with open(index, newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or not set(export.INDEX_COLUMNS) <= set(reader.fieldnames):
      raise ValueError(f"{index}: expected columns {', '.join(export.INDEX_COLUMNS)}; got "
                       f"{reader.fieldnames}")
    rows = []
    for line, row in enumerate(reader, start=2):
      try:
        rows.append({"tracklet": row["tracklet"], "pid": int(row["pid"]),
                     "camera": int(row["camera"]), "num_frames": int(row["num_frames"]),
                     "first_frame": row["first_frame"]})
      except (TypeError, ValueError) as e:
        raise ValueError(f"{index} line {line}: pid, camera and num_frames must be integers, "
                         f"got {row}") from e
  if len(rows) != feats.shape[0]:
    raise ValueError(f"{index}: {len(rows)} rows but {path} has {feats.shape[0]} embeddings")
  return feats.astype(np.float32), rows


def top_k(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(Q, G) distances -> (Q, k') gallery indices and distances, nearest first; k' = min(k, G).

  Ties keep gallery order (stable sort).
  """
  if k < 1:
    raise ValueError(f"--topk={k}: expected >= 1")
  k = min(k, dist.shape[1])
  order = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(dist, order, axis=1)


def _tile(path: str | None, height: int, width: int) -> np.ndarray:
  """(height, width, 3) uint8 picture of `path`, or a grey tile when it is not a readable file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if path and os.path.isfile(path):
    try:
      with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((width, height)), np.uint8)
    except Exception:  # pylint: disable=broad-except  # a bad file is shown as grey, not fatal
      pass
  return np.full((height, width, 3), GREY, np.uint8)


def frame_color(query_pid: int, gallery_pid: int) -> str | None:
  """Green for the same identity, red for another one, None when either pid is unknown (-1)."""
  if query_pid < 0 or gallery_pid < 0:
    return None
  return MATCH_COLOR if query_pid == gallery_pid else MISMATCH_COLOR


def ranked_list_png(path: str, query_frame: str, query_pid: int,
                    matches: Sequence[dict[str, Any]], height: int, width: int) -> str:
  """Picture: the query's first frame, then one tile per match (with `first_frame`, `pid`,
  `distance`), framed by `frame_color`. Writes a PNG at `path` with the Agg backend."""
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top

  n = len(matches) + 1
  fig = figure.Figure(figsize=(1.1 * n, 2.6))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(1, n, squeeze=False)[0]
  axes[0].imshow(_tile(query_frame, height, width))
  axes[0].set_title(f"query\npid {query_pid}" if query_pid >= 0 else "query", fontsize=7)
  for ax, match in zip(axes[1:], matches):
    ax.imshow(_tile(match["first_frame"], height, width))
    ax.set_title(f"#{match['rank']} pid {match['pid']}\n{match['distance']:.3f}", fontsize=7)
    color = frame_color(query_pid, match["pid"])
    for spine in ax.spines.values():
      spine.set_visible(color is not None)
      if color is not None:
        spine.set_edgecolor(color)
        spine.set_linewidth(3)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0].spines[:].set_visible(False)
  fig.savefig(path, format="png", dpi=80, bbox_inches="tight")
  return path


def _png_name(name: str) -> str:
  return name.replace(os.sep, "_").replace("/", "_") + ".png"


@app.register_mode("search")
def search_mode(
    config: ml_collections.ConfigDict, workdir: str, query: str | None = None,
    gallery: str | None = None, topk: int = DEFAULT_TOPK,
) -> dict:
  """Embeds the tracklet folders of `query`, ranks the `gallery` embeddings by
  `config.eval.distance`, prints the top-k of each query and writes `W/search/results.json`
  plus `W/search/<query>.png`."""
  from stmn_jax import evaluation  # pylint: disable=g-import-not-at-top

  if not query or not gallery:
    raise ValueError("--mode=search needs --query=DIR (tracklet folders) and "
                     "--gallery=FEATURES.npy (from --mode=extract)")
  if topk < 1:
    raise ValueError(f"--topk={topk}: expected >= 1")
  g_feats, g_rows = load_gallery(gallery)
  names, tracklets = export.read_folder(query)
  mesh = sharding.make_mesh()
  sharding.check_batch_config(config, mesh)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.source = "files"
  state, ckpt_label, _ = export.restore_model(config, workdir, mesh, num_classes=None)
  q_feats = export.embed_tracklets(state, tracklets, config, mesh)
  if q_feats.shape[1] != g_feats.shape[1]:
    raise ValueError(f"--gallery={gallery}: {g_feats.shape[1]}-d embeddings but the model "
                     f"gives {q_feats.shape[1]}-d ones")
  metric = config.eval.distance
  dist = evaluation.pairwise_distance(q_feats, g_feats, metric)
  order, top = top_k(dist, topk)
  out_dir = search_dir(workdir)
  results = []
  lines = [f"\nSearch ({metric} distance, {ckpt_label}): {len(names)} queries against "
           f"{len(g_rows)} gallery tracklets of {gallery}"]
  write = jax.process_index() == 0
  if write:
    os.makedirs(out_dir, exist_ok=True)
  for qi, (name, t) in enumerate(zip(names, tracklets)):
    matches = [dict(rank=r + 1, **{k: g_rows[gi][k] for k in ("tracklet", "pid", "camera",
                                                                "first_frame")},
                    distance=float(top[qi, r]))
               for r, gi in enumerate(order[qi])]
    png = os.path.join(out_dir, _png_name(name))
    if write:
      ranked_list_png(png, t.frames[0], t.pid, matches, config.data.height, config.data.width)
    results.append({"query": name, "pid": t.pid, "camera": t.camid, "picture": png,
                    "matches": matches})
    lines.append(f"query {name} (pid {t.pid}, camera {t.camid}):")
    lines += [f"  {m['rank']:3d}  {m['tracklet']:<24s} pid {m['pid']:>5d}  camera "
              f"{m['camera']:>3d}  distance {m['distance']:.4f}" for m in matches]
  summary = {"mode": "search", "checkpoint": ckpt_label, "query_dir": os.path.abspath(query),
             "gallery": os.path.abspath(gallery), "metric": metric, "topk": int(order.shape[1]),
             "results": results}
  path = os.path.join(out_dir, "results.json")
  if write:
    with open(path, "w") as f:
      json.dump(summary, f, indent=1)
  lines.append(f"  -> {path}")
  print("\n".join(lines), flush=True)
  return {**summary, "results_json": path}
