"""--mode=visualize: the figures of a trained workdir (issue #6), as PNG files plus their numbers.

`python main.py --mode=visualize --config=... --workdir=W [--split=gallery] [--topk=10]
[--compare_workdir=W2]` restores W's best (or latest) checkpoint and writes to `W/visualize/`:

- `memory_probs.png`: matching probabilities of the spatial memory (random locations of random
  frames) and of the temporal memory (random tracklets), rows = queries, columns = memory items,
  with the mean usage of each item below; with `--compare_workdir` (e.g. the same model trained
  without the spread loss) both models side by side, on the same inputs (paper Fig. 5);
- `norm_change.png`: ||f_s|| - ||f_o|| per location, over the frames of a few tracklets of the
  most cluttered cameras (paper Fig. 7);
- `temporal_weights.png`: the temporal memory's frame weights over the frames of tracklets with
  occlusion, misalignment and none, distractor frames shaded (synthetic benchmark only: the
  flags come from its sidecar; paper Fig. 10);
- `ranked_lists.png` (+ one `ranked/<query>.png` each): query and top-k gallery tracklets framed
  green (same identity) / red (paper Fig. 8), and `visrank/` in torchreid's video layout;
- `curves.png`: training loss terms and validation / test mAP from the TensorBoard events;
- `visualize.json`: the numbers behind the figures (sampled probabilities with their inputs,
  entropy and usage, frame weights, mean weight of distractor vs clean frames).

Memory figures are drawn only for STMN variants that have that memory. `--split` picks the
part of the test split the tracklet figures draw from (query | gallery | train, default
gallery, which under the official protocols holds every test tracklet). All sample sizes live
in `config.visualize`. Runs in one process. The workdirs may be local or `gs://...`: their files
are read and written through `etils.epath` (`workdir_io`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath
from flax import nnx
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from data_pipelines import pipeline
from data_pipelines.synthetic import generator
from stmn_jax import errors
from stmn_jax import figures
from stmn_jax import inference
from stmn_jax import ranking
from stmn_jax import sharding
from stmn_jax import visrank
from stmn_jax import workdir_io

PARTS = ("query", "gallery", "train")
DEFAULT_PART = "gallery"
# Per-frame flags of the synthetic sidecar (data_pipelines/synthetic/generator.FLAGS).
DISTRACTOR_FLAGS = ("occluded", "misaligned", "out_of_frame", "other_person")
WEIGHT_KINDS = ("occluded", "misaligned", "none")  # rows of the temporal-weights figure
FORWARD_KEYS = ("spatial_probs", "temporal_probs", "frame_weights")
CLUTTER_FRAMES = 16  # frames per camera whose median image scores the camera's clutter
FIGURES = ("memory_probs", "norm_change", "temporal_weights", "ranked_lists", "curves")


def visualize_dir(workdir: str) -> str:
  return str(workdir_io.workdir_path(workdir) / "visualize")


def _rng(seed: int, stream: int) -> np.random.Generator:
  """One independent stream per figure, so figures do not change each other's draws."""
  return np.random.default_rng([int(seed), stream])


# ------------------------------------------------------------------------------ inputs


def synthetic_meta(config: ml_collections.ConfigDict,
                   tracklets: Sequence[Any]) -> list[dict | None] | None:
  """Sidecar entries (per-frame distractor flags) of `tracklets`, or None off the synthetic
  benchmark (or when none of them is found in it)."""
  if config.dataset.name != "synthetic":
    return None
  try:
    meta = generator.meta_for(config.dataset.root, tracklets)
  except FileNotFoundError as e:
    logging.warning("no synthetic sidecar: %s", e)
    return None
  return meta if any(m is not None for m in meta) else None


class FrameLoader:
  """uint8 frames `(n, H, W, 3)` of a tracklet, decoded and resized as the eval pipeline does."""

  def __init__(self, tracklets: Sequence[Any], config: ml_collections.ConfigDict):
    self._source = pipeline.frame_source(tracklets, config)
    self._hw = int(config.data.height), int(config.data.width)

  def __call__(self, index: int, frames: Sequence[int]) -> np.ndarray:
    out = self._source.load(tf.constant(int(index), tf.int64),
                            tf.constant(np.asarray(frames, np.int64)), *self._hw)
    return np.asarray(out, np.uint8)


# ------------------------------------------------------------------------------ model passes
def make_forward(state, mesh, maps: bool) -> Callable:
  """Jitted `(model_state, frames (B, L, H, W, 3)) -> dict` of the outputs figures read:
  `spatial_probs` (B, L, h*w, M), `temporal_probs` (B, N), `frame_weights` (B, L) where the
  model has them; with `maps` also `norm_change` (B, L, h, w) = ||f_s|| - ||f_o|| and
  `value_norm` (B, L, h, w) = ||f_o|| (STMN)."""
  model_def = state.model_def_eval

  def forward(model_state, frames):
    model = nnx.merge(model_def, model_state)
    out = model(frames, return_maps=True) if maps else model(frames)
    res = {k: out[k].astype(jnp.float32) for k in FORWARD_KEYS if k in out}
    if maps:
      res["value_norm"] = jnp.linalg.norm(out["value_maps"].astype(jnp.float32), axis=-1)
      res["norm_change"] = jnp.linalg.norm(
          out["refined_maps"].astype(jnp.float32), axis=-1) - res["value_norm"]
    return res

  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(forward, in_shardings=(rep, dat), out_shardings=dat)


def run_clips(model_state, forward: Callable, tracklets: Sequence[Any],
              config: ml_collections.ConfigDict, mesh, clips: str | None = None):
  """Every all-frames clip (`clips`, default `config.eval.clips`) of `tracklets` through
  `forward(model_state, frames)` -> (tracklet index (R,), frame indices (R, L),
  {output: (R, ...)}), R real clips in tracklet order."""
  batches = pipeline.eval_iterator(tracklets, config, sampling="all_frames",
                                   clips=clips or config.eval.clips)
  outs = []
  for batch in batches:
    frames = sharding.global_batch({"frames": batch["frames"]}, mesh)["frames"]
    outs.append(jax.device_get(forward(model_state, frames)))
  plan, n = batches.plan, batches.plan.num_clips
  merged = {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]} if outs else {}
  return plan.tracklet[:n].astype(np.int64), plan.frames[:n].astype(np.int64), merged


def first_clip_rows(tracklet_index: np.ndarray) -> np.ndarray:
  """(R,) tracklet index of each clip -> row of each tracklet's first clip, in tracklet order."""
  _, first = np.unique(tracklet_index, return_index=True)
  return first


# ------------------------------------------------------------------------------ numbers


def memory_stats(probs: np.ndarray) -> dict:
  """(R, M) matching probabilities -> entropy / usage numbers.

  `mean_entropy` per query (nats; `max_entropy` = log M for uniform addressing),
  `normalized_entropy` = mean_entropy / log M, `mean_max_prob`, `usage` (mean probability per
  item), `usage_perplexity` = exp(entropy of usage) (how many items are used on average, 1..M),
  `argmax_counts` (queries whose most likely item is each item).
  """
  p = np.asarray(probs, np.float64).reshape(-1, np.shape(probs)[-1])
  m = p.shape[1]
  ent = figures.entropy(p)
  usage = p.mean(axis=0)
  return {
      "rows": int(p.shape[0]), "slots": int(m), "mean_entropy": float(ent.mean()),
      "max_entropy": float(np.log(m)),
      "normalized_entropy": float(ent.mean() / np.log(m)) if m > 1 else 0.0,
      "mean_max_prob": float(p.max(axis=1).mean()), "usage": usage.tolist(),
      "usage_perplexity": float(np.exp(figures.entropy(usage))),
      "argmax_counts": np.bincount(p.argmax(axis=1), minlength=m).tolist(),
  }


def clip_flags(meta: Mapping[str, Any], frames: np.ndarray, kind: str) -> np.ndarray:
  """(L,) frame indices of one clip -> (L,) bool: the frame carries `kind` ("any": any flag)."""
  kinds = DISTRACTOR_FLAGS if kind == "any" else (kind,)
  return np.any([np.asarray(meta[k], bool)[frames] for k in kinds], axis=0)


def real_positions(frames: np.ndarray) -> np.ndarray:
  """(L,) frame indices -> (L,) bool, False where a padded clip repeats an earlier frame."""
  frames = np.asarray(frames)
  return np.asarray([frames[j] not in frames[:j] for j in range(len(frames))])


def distractor_weight_stats(
    weights: np.ndarray, frames: np.ndarray, tracklet_index: np.ndarray,
    meta: Sequence[Mapping[str, Any] | None], kinds: Sequence[str] = DISTRACTOR_FLAGS + ("any",),
) -> dict:
  """Mean temporal weight of distractor frames vs clean ones, per distractor kind.

  weights (R, L) of R clips, frames (R, L) their frame indices, tracklet_index (R,). Only
  clips holding both kinds of frames count (weights sum to 1 within a clip, so a clip of
  distractor frames only says nothing); a clean frame carries no flag at all; repeated
  (padding) positions are left out. Uniform weighting is 1 / L.
  """
  out = {}
  for kind in kinds:
    flagged, clean, clips = [], [], 0
    for w, f, t in zip(weights, frames, tracklet_index):
      m = meta[int(t)]
      if m is None:
        continue
      real = real_positions(f)
      bad = clip_flags(m, f, kind) & real
      good = ~clip_flags(m, f, "any") & real
      if bad.any() and good.any():
        clips += 1
        flagged += w[bad].tolist()
        clean += w[good].tolist()
    out[kind] = {
        "clips": clips, "flagged_frames": len(flagged), "clean_frames": len(clean),
        "mean_weight_flagged": float(np.mean(flagged)) if flagged else None,
        "mean_weight_clean": float(np.mean(clean)) if clean else None,
        "uniform": 1.0 / weights.shape[1] if len(weights) else None,
    }
  return out


def camera_clutter(tracklets: Sequence[Any], load: Callable, rng: np.random.Generator,
                   frames_per_camera: int = CLUTTER_FRAMES) -> dict[int, float]:
  """{camera: clutter score}: mean absolute gradient of the per-pixel median of random frames
  of the camera's tracklets (people vary from frame to frame; the static scene stays)."""
  by_cam: dict[int, list[int]] = {}
  for i, t in enumerate(tracklets):
    by_cam.setdefault(int(t.camid), []).append(i)
  scores = {}
  for cam, idx in sorted(by_cam.items()):
    picks = rng.choice(len(idx), size=min(frames_per_camera, len(idx)), replace=False)
    imgs = []
    for p in picks:
      t = tracklets[idx[p]]
      imgs.append(load(idx[p], [int(rng.integers(t.num_frames))])[0])
    gray = np.median(np.stack(imgs).astype(np.float32), axis=0).mean(axis=-1) / 255.0
    scores[cam] = float(np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean())
  return scores


# ------------------------------------------------------------------------------ TensorBoard
def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Scalars of the TensorBoard event files in `workdir`: {tag: (steps, values)} by step.

  clu writes TF2 summaries, i.e. scalars as 0-d `tensor` values; older `simple_value` events
  are read too. A step written twice (a resumed run) keeps the last value.
  """
  data: dict[str, dict[int, float]] = {}
  for path in sorted(workdir_io.workdir_path(workdir).glob("events.out.tfevents.*")):
    for event in read_events(path):
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
          x = float(value.simple_value)
        elif kind == "tensor":
          arr = tensor_util.make_ndarray(value.tensor)
          if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
            continue  # hparams, text, ...
          x = float(arr.reshape(()))
        else:
          continue
        data.setdefault(value.tag, {})[int(event.step)] = x
  return {tag: (np.asarray(sorted(d), np.int64), np.asarray([d[s] for s in sorted(d)]))
          for tag, d in data.items()}


def read_events(path: epath.Path) -> Iterator[event_pb2.Event]:
  """The events of one TensorBoard event file, read through epath (local or `gs://`).

  The file is a TFRecord file: per record a little-endian uint64 length, its masked CRC32, the
  serialized `Event` and its masked CRC32 (the CRCs are not checked). A truncated last record
  (a run still writing) ends the file, as in TensorBoard's reader.
  """
  data = path.read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    start = pos + 12
    if start + length + 4 > len(data):
      return
    yield event_pb2.Event.FromString(data[start:start + length])
    pos = start + length + 4


# ------------------------------------------------------------------------------ figures


# ------------------------------------------------------------------------------ figure steps
def clip_pass(model_state, forward: Callable, tracklets: Sequence[Any], ids: Sequence[int],
              config: ml_collections.ConfigDict, mesh):
  """Consecutive clips of `tracklets[ids]` through `forward` -> (index into `tracklets` (R,),
  frame indices (R, L), outputs). Consecutive runs of L frames, so that a figure's frames are
  neighbours and a short distractor shares its clip with clean frames."""
  ids = np.asarray(sorted(ids), np.int64)
  t_idx, frames, out = run_clips(model_state, forward, [tracklets[i] for i in ids], config, mesh,
                                 clips="consecutive")
  return ids[t_idx] if len(ids) else t_idx, frames, out


def _rows_of(clips, ids: Sequence[int]):
  """The rows of a `clip_pass` result that belong to the tracklets `ids`."""
  t_idx, frames, out = clips
  keep = np.isin(t_idx, np.asarray(list(ids), np.int64))
  return t_idx[keep], frames[keep], {k: v[keep] for k, v in out.items()}


def _memory_picks(tracklets, config) -> np.ndarray:
  v = config.visualize
  return np.sort(_rng(v.seed, 0).choice(len(tracklets), replace=False,
                                        size=min(v.memory_tracklets, len(tracklets))))


def _memory_step(passes: Mapping[str, Any], picks, config, out_dir, labels):
  """Memory figure + numbers on the same random clips for each model of `passes`
  ({"model": clip_pass result, "compare": ...})."""
  rng = _rng(config.visualize.seed, 4)
  panels, numbers = [], {}
  draws = None
  for name, clips in passes.items():
    t_idx, frames, out = _rows_of(clips, picks)
    first = first_clip_rows(t_idx)
    entry: dict[str, Any] = {"label": labels[name]}
    panel: dict[str, Any] = {"label": labels[name], "spatial": None, "temporal": None}
    if "spatial_probs" in out:
      sp = out["spatial_probs"]  # (R, L, h*w, M)
      if draws is None:  # one random frame and location per tracklet, shared by both models
        draws = (rng.integers(sp.shape[1], size=len(first)),
                 rng.integers(sp.shape[2], size=len(first)))
      rows = sp[first, draws[0], draws[1]]
      panel["spatial"] = rows
      entry["spatial"] = {
          "rows": [{"tracklet": int(t_idx[r]), "frames": frames[r].tolist(),
                    "frame": int(l), "location": int(loc), "probs": p.tolist()}
                   for r, l, loc, p in zip(first, draws[0], draws[1], rows)],
          "stats_sampled": memory_stats(rows),
          "stats_all_locations": memory_stats(sp),
      }
    if "temporal_probs" in out:
      tp = out["temporal_probs"]
      panel["temporal"] = tp[first]
      entry["temporal"] = {
          "rows": [{"tracklet": int(t_idx[r]), "frames": frames[r].tolist(),
                    "probs": tp[r].tolist()} for r in first],
          "stats_sampled": memory_stats(tp[first]),
          "stats_all_clips": memory_stats(tp),
      }
    panels.append(panel)
    numbers[name] = entry
  png = figures.memory_probs_figure(str(epath.Path(out_dir) / "memory_probs.png"), panels)
  return png, numbers


def _clean_person(meta: Mapping[str, Any] | None) -> bool:
  """A sidecar entry of a real identity's tracklet without temporal distractors."""
  return meta is not None and meta.get("kind") == "person" and not meta["distractors"]


def _norm_change_picks(tracklets, meta, load, config) -> tuple[list[int], dict[int, float]]:
  """Tracklets (of >= L frames, real identities, no temporal distractor when the sidecar
  says so) of the most cluttered cameras first; and the cameras' clutter scores."""
  v = config.visualize
  rng = _rng(v.seed, 1)
  length = int(config.data.seq_len)
  clutter = camera_clutter(tracklets, load, rng)
  picks: list[int] = []
  for cam in sorted(clutter, key=lambda c: -clutter[c]):
    cands = [i for i, t in enumerate(tracklets) if t.camid == cam and t.num_frames >= length
             and t.pid >= 0 and (meta is None or _clean_person(meta[i]))]
    need = v.num_tracklets - len(picks)
    picks += [cands[j] for j in rng.permutation(len(cands))[:need]]
    if len(picks) >= v.num_tracklets:
      break
  return picks, clutter


def _norm_change_step(clips, picks, clutter, tracklets, load, out_dir):
  t_idx, frames, out = _rows_of(clips, picks)
  first = first_clip_rows(t_idx)
  change = out["norm_change"][first]
  images = np.stack([load(t_idx[r], frames[r]) for r in first])
  titles = [f"pid {tracklets[t_idx[r]].pid}, camera {tracklets[t_idx[r]].camid} (clutter "
            f"{clutter[tracklets[t_idx[r]].camid]:.3f}), frames {frames[r].tolist()}"
            for r in first]
  png = figures.norm_change_figure(str(epath.Path(out_dir) / "norm_change.png"), images, change,
                                  titles)
  numbers = {
      "camera_clutter": {str(k): s for k, s in clutter.items()},
      "tracklets": [{"tracklet": int(t_idx[r]), "frames": frames[r].tolist(),
                     "mean_change": float(change[j].mean()),
                     "min_change": float(change[j].min()), "max_change": float(change[j].max()),
                     "mean_value_norm": float(out["value_norm"][r].mean())}
                    for j, r in enumerate(first)],
  }
  return png, numbers


def _pick_weight_rows(tracklets, meta, config) -> list[tuple[str, int]]:
  """(kind, tracklet index) for each kind of WEIGHT_KINDS: tracklets carrying that distractor
  (and no other) on some but not all of the frames shown, or no distractor at all ("none")."""
  v, length = config.visualize, int(config.data.seq_len)
  rng = _rng(v.seed, 2)
  out = []
  for kind in WEIGHT_KINDS:
    cands = []
    for i, (t, m) in enumerate(zip(tracklets, meta)):
      if m is None or t.num_frames < length or m.get("kind") != "person":
        continue
      if kind == "none":
        ok = not m["distractors"]
      else:
        shown = np.asarray(m[kind][:v.max_frames], bool)
        ok = m["distractors"] == [kind] and shown.any() and not shown.all()
      if ok:
        cands.append(i)
    out += [(kind, cands[j]) for j in rng.permutation(len(cands))[:v.num_tracklets]]
  return out


def _temporal_step(clips, flagged_ids, picks, tracklets, meta, load, config, out_dir):
  """Frame weights over consecutive clips: distractor vs clean numbers and the figure."""
  v, length = config.visualize, int(config.data.seq_len)
  t_idx, frames, out = _rows_of(clips, flagged_ids)
  weights = out["frame_weights"]
  stats = distractor_weight_stats(weights, frames, t_idx, meta)
  rows, picked = [], []
  for kind, i in picks:
    shown = min(tracklets[i].num_frames, v.max_frames)
    w = np.full(shown, np.nan)
    clip_rows = np.flatnonzero(t_idx == i)
    for r in clip_rows:
      real = real_positions(frames[r])
      for j, f in enumerate(frames[r]):
        if f < shown and np.isnan(w[f]) and real[j]:
          w[f] = weights[r, j]
    flags = clip_flags(meta[i], np.arange(shown), "any")
    rows.append({"title": f"{kind}: pid {tracklets[i].pid}, camera {tracklets[i].camid}, "
                          f"{tracklets[i].num_frames} frames", "frames": load(i, range(shown)),
                 "weights": w, "flagged": flags, "seq_len": length})
    picked.append({"kind": kind, "tracklet": int(i),
                   "clips": [frames[r].tolist() for r in clip_rows],
                   "weights": [weights[r].tolist() for r in clip_rows]})
  png = None
  if rows:
    png = figures.temporal_weights_figure(str(epath.Path(out_dir) / "temporal_weights.png"),
                                          rows)
  else:
    logging.warning("temporal-weights figure: no tracklet of >= %d frames with the wanted "
                    "distractors; skipped", length)
  return png, {"clips": "consecutive", "tracklets": picked, "distractor_vs_clean": stats}


def _ranking_step(state, test_split, config, mesh, out_dir, topk):
  v = config.visualize
  query, gallery = list(test_split.query), list(test_split.gallery)
  unique: dict[Any, int] = {}
  for t in query + gallery:
    unique.setdefault(t, len(unique))
  feats = inference.embed_tracklets(state, list(unique), config, mesh, progress=True)
  q = feats[[unique[t] for t in query]]
  g = feats[[unique[t] for t in gallery]]
  dist = ranking.pairwise_distance(q, g, config.eval.distance)
  g_pids = np.asarray([t.pid for t in gallery])
  g_cams = np.asarray([t.camid for t in gallery])
  rng = _rng(v.seed, 3)
  picks = np.sort(rng.choice(len(query), size=min(v.num_queries, len(query)), replace=False))
  ranked_dir = epath.Path(out_dir) / "ranked"
  ranked_dir.mkdir(parents=True, exist_ok=True)
  pngs, lists = [], []
  for qi in picks:
    t = query[qi]
    idx = visrank.ranked_gallery(dist[qi], t.pid, t.camid, g_pids, g_cams, topk)
    matches = [{"rank": r + 1, "gallery": int(gi), "pid": int(gallery[gi].pid),
                "camera": int(gallery[gi].camid), "first_frame": gallery[gi].frames[0],
                "distance": float(dist[qi, gi])} for r, gi in enumerate(idx)]
    name = os.path.splitext(os.path.basename(t.frames[0]))[0]
    pngs.append(figures.ranked_list_png(str(ranked_dir / f"{name}.png"), t.frames[0],
                                          t.pid, matches, config.data.height, config.data.width))
    lists.append({"query": int(qi), "pid": int(t.pid), "camera": int(t.camid),
                  "matches": matches})
  png = figures.stack_pngs(pngs, str(epath.Path(out_dir) / "ranked_lists.png")) if pngs else None
  visrank_dir = str(epath.Path(out_dir) / "visrank")
  if query and os.path.isfile(query[0].frames[0]):  # a dataset frame
    folders = visrank.export_visrank(visrank_dir, dist, query, gallery, topk, v.visrank_queries)
  else:
    logging.warning("visrank export skipped: frames are not files (config.data.source=%s)",
                    config.data.get("source", "files"))
    folders, visrank_dir = [], None
  return png, {"metric": config.eval.distance, "topk": topk, "queries": lists,
               "visrank_dir": visrank_dir, "visrank_queries": len(folders),
               "ranked_pngs": pngs}


def _steps_per_epoch(workdir: str) -> int | None:
  """`steps_per_epoch` from W/results.json, or None (curves then use steps) when it is missing
  or unreadable."""
  try:
    return json.loads((epath.Path(workdir) / "results.json").read_text()).get("steps_per_epoch")
  except (*workdir_io.io_errors(), ValueError, AttributeError):
    return None


def _curves_step(workdir, compare_workdir, labels, out_dir):
  runs = {labels["model"]: read_scalars(workdir)}
  if compare_workdir:
    runs[labels["compare"]] = read_scalars(compare_workdir)
  if not any(runs.values()):
    logging.warning("curves: no TensorBoard scalars in %s; skipped", workdir)
    return None, {"skipped": "no TensorBoard scalars"}
  png = figures.curves_figure(str(epath.Path(out_dir) / "curves.png"), runs,
                              _steps_per_epoch(workdir))
  return png, {label: {"loss_tags": figures.loss_tags(s),
                       "mAP": {t: s[t][1].tolist() for t in s if t.endswith("_mAP")},
                       "mAP_steps": {t: s[t][0].tolist() for t in s if t.endswith("_mAP")}}
               for label, s in runs.items()}


# ------------------------------------------------------------------------------ the mode
def visualize_mode(
    config: ml_collections.ConfigDict, workdir: str, split: str | None = None, topk: int = 0,
    compare_workdir: str | None = None,
) -> dict:
  """Writes the figures of `workdir`'s best / latest checkpoint to `W/visualize/` (see the
  module docstring); `compare_workdir` adds a second model (same architecture) to the memory
  figure and the curves. Returns {"figures": {name: png}, "json": path, ...}."""
  if jax.process_count() > 1:
    raise errors.ConfigError("--mode=visualize runs in a single process (got "
                     f"{jax.process_count()} processes)")
  part = split or DEFAULT_PART
  if part not in PARTS:
    raise errors.ConfigError(f"--split={split!r}: expected one of {', '.join(PARTS)} (the part of the "
                     "test split the tracklet figures draw from)")
  topk = int(topk or config.visualize.topk)
  if topk < 1:
    raise errors.ConfigError(f"--topk={topk}: expected >= 1")
  if compare_workdir:
    inference.check_workdir(compare_workdir, "--compare_workdir")
  run = inference.prepare(config, workdir)
  mesh, test_split = run.mesh, run.setup.test_split
  state, label, step = run.state, run.checkpoint, run.step
  other, other_label = None, None
  if compare_workdir:
    other, other_label, _ = inference.restore_model(config, compare_workdir, mesh,
                                                    num_classes=run.setup.num_classes)
  labels = {"model": os.path.basename(os.path.normpath(workdir)) or workdir,
            "compare": os.path.basename(os.path.normpath(compare_workdir or "")) or "compare"}
  if labels["compare"] == labels["model"]:  # e.g. .../stmn/seed0 vs .../stmn_nospread/seed0
    labels = {k: "/".join(os.path.normpath(w).split(os.sep)[-2:]) for k, w in
              (("model", workdir), ("compare", compare_workdir or "compare"))}
  model = state.model()  # STMN variants say which memories they have; other models have none
  has_sm = bool(getattr(model, "use_spatial", False))
  has_tm = bool(getattr(model, "use_temporal", False))
  out_dir = visualize_dir(workdir)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  tracklets = list(test_split.part(part))
  meta = synthetic_meta(config, tracklets)
  load = FrameLoader(tracklets, config)
  # Pick every figure's tracklets first, then one compiled pass over their clips per model
  # (the compare model has the same graph, other parameters).
  mem_picks = _memory_picks(tracklets, config) if has_sm or has_tm else []
  norm_picks, clutter = _norm_change_picks(tracklets, meta, load, config) if has_sm else ([], {})
  flagged = [i for i, m in enumerate(meta) if m is not None] if has_tm and meta else []
  weight_picks = _pick_weight_rows(tracklets, meta, config) if flagged else []
  forward = make_forward(state, mesh, maps=has_sm)
  needed = sorted(set(map(int, mem_picks)) | set(norm_picks) | set(flagged))
  clips = clip_pass(state.model_state, forward, tracklets, needed, config, mesh) if needed \
      else None
  pngs: dict[str, str | None] = {}
  numbers: dict[str, Any] = {
      "checkpoint": label, "step": step, "compare_workdir": compare_workdir,
      "compare_checkpoint": other_label, "labels": labels, "split": part,
      "num_tracklets": len(tracklets), "seq_len": int(config.data.seq_len),
      "config": config.visualize.to_dict(),
  }
  if has_sm or has_tm:
    passes = {"model": clips}
    if other is not None:
      passes["compare"] = clip_pass(other.model_state, forward, tracklets, mem_picks, config,
                                    mesh)
    pngs["memory_probs"], numbers["memory"] = _memory_step(
        passes, mem_picks, config, out_dir, labels)
  else:
    logging.info("memory figure skipped: %s has no memory", config.model.preset)
  if has_sm and norm_picks:
    pngs["norm_change"], numbers["norm_change"] = _norm_change_step(
        clips, norm_picks, clutter, tracklets, load, out_dir)
  elif has_sm:
    logging.warning("norm-change figure: no tracklet of >= %d frames; skipped",
                    config.data.seq_len)
  if flagged:
    pngs["temporal_weights"], numbers["temporal_weights"] = _temporal_step(
        clips, flagged, weight_picks, tracklets, meta, load, config, out_dir)
  elif has_tm:
    logging.info("temporal-weights figure skipped: %s has no per-frame distractor flags "
                 "(synthetic benchmark only)", config.dataset.name)
  pngs["ranked_lists"], numbers["ranking"] = _ranking_step(
      state, test_split, config, mesh, out_dir, topk)
  pngs["curves"], numbers["curves"] = _curves_step(
      workdir, compare_workdir, labels, out_dir)
  pngs = {k: p for k, p in pngs.items() if p}
  numbers["figures"] = pngs
  path = str(epath.Path(out_dir) / "visualize.json")
  workdir_io.write_text_atomic(path, json.dumps(numbers, indent=1))
  lines = [f"\nFigures of {workdir} ({label}) in {out_dir}:"]
  lines += [f"  {name}: {png}" for name, png in pngs.items()]
  tw = numbers.get("temporal_weights", {}).get("distractor_vs_clean", {}).get("any")
  if tw and tw["clips"]:
    lines.append(f"  temporal weights in clips mixing both: distractor frames "
                 f"{tw['mean_weight_flagged']:.4f}, clean frames {tw['mean_weight_clean']:.4f} "
                 f"(uniform {tw['uniform']:.4f}, {tw['clips']} clips)")
  for name, entry in numbers.get("memory", {}).items():
    for mem in ("spatial", "temporal"):
      if mem in entry:
        s = entry[mem]["stats_all_locations" if mem == "spatial" else "stats_all_clips"]
        lines.append(f"  {entry['label']} {mem} memory: entropy/log M "
                     f"{s['normalized_entropy']:.3f}, usage perplexity "
                     f"{s['usage_perplexity']:.2f} of {s['slots']}")
  lines.append(f"  numbers: {path}")
  print("\n".join(lines), flush=True)
  return {"mode": "visualize", "checkpoint": label, "figures": pngs, "json": path,
          "out_dir": out_dir}
