"""Figure drawing, in one place: every PNG the modes write (matplotlib Agg, no screen).

Pure `(path, arrays) -> path` functions: ranked lists (`--mode=search`, `--mode=visualize`),
memory matching probabilities, feature-norm change maps, temporal weights and training curves
(`--mode=visualize`). The numbers behind them are computed by the modes. Output paths may be
local or in an object store (`gs://...`): PNGs are written and read back through `etils.epath`;
the frames drawn in the tiles are dataset files.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging
from etils import epath
from matplotlib import figure
from matplotlib.backends import backend_agg
from PIL import Image

PNG_DPI = 100
RANKED_LIST_DPI = 80
GREY = 128  # tile value of a gallery entry whose first frame is not on disk
MATCH_COLOR, MISMATCH_COLOR = "tab:green", "tab:red"


def _figure(width: float, height: float):
  fig = figure.Figure(figsize=(width, height))
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str, dpi: int = PNG_DPI) -> str:
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
  return path


def _tile(path: str | None, height: int, width: int) -> np.ndarray:
  """(height, width, 3) uint8 picture of `path`, or a grey tile when it is not a readable file."""
  if path and os.path.isfile(path):  # a dataset frame, not a workdir file
    try:
      with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((width, height)), np.uint8)
    except Exception as e:  # pylint: disable=broad-except  # PIL raises several types
      logging.warning("%s: unreadable (%s); drawn as a grey tile", path, e)
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
  n = len(matches) + 1
  fig = _figure(1.1 * n, 2.6)
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
  return _save(fig, path, dpi=RANKED_LIST_DPI)


def stack_pngs(paths: Sequence[str], out: str) -> str:
  """Stacks PNG pictures top to bottom (left aligned, white background) into `out`."""
  images = []
  for p in paths:
    with Image.open(io.BytesIO(epath.Path(p).read_bytes())) as im:
      images.append(im.convert("RGB"))
  canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)),
                     "white")
  y = 0
  for im in images:
    canvas.paste(im, (0, y))
    y += im.height
  with epath.Path(out).open("wb") as f:
    canvas.save(f, format="PNG")
  return out


def entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
  """Shannon entropy (nats) of distributions along `axis`."""
  p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
  return -np.sum(p * np.log(p), axis=axis)


def loss_tags(scalars: Mapping[str, Any]) -> list[str]:
  """The training loss terms among the scalar tags (`train_*` but learning rate, grad norm)."""
  return sorted(t for t in scalars if t.startswith("train_")
                and t not in ("train_lr", "train_grad_norm"))


def memory_probs_figure(path: str, panels: Sequence[Mapping[str, Any]]) -> str:
  """Heatmaps of matching probabilities (rows queries, sorted by their most likely item;
  columns memory items) over bars of the mean usage per item. `panels`: dicts with `label`
  and `spatial` (R, M) and / or `temporal` (R', N) arrays (None to leave one out)."""
  cols = [(p["label"], name, np.asarray(p[name])) for p in panels
          for name in ("spatial", "temporal") if p.get(name) is not None]
  fig = _figure(2.6 * len(cols), 5.2)
  grid = fig.add_gridspec(2, len(cols), height_ratios=(3, 1))
  image = None
  for c, (label, name, probs) in enumerate(cols):
    order = np.lexsort((-probs.max(axis=1), probs.argmax(axis=1)))
    ax = fig.add_subplot(grid[0, c])
    image = ax.imshow(probs[order], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ent = entropy(probs).mean() / np.log(probs.shape[1])
    ax.set_title(f"{label}\n{name} memory\nentropy/log M = {ent:.2f}", fontsize=8)
    ax.set_xticks(range(probs.shape[1]))
    ax.tick_params(labelsize=6)
    ax.set_ylabel("query", fontsize=7)
    bar = fig.add_subplot(grid[1, c])
    bar.bar(range(probs.shape[1]), probs.mean(axis=0), color="tab:blue")
    bar.axhline(1.0 / probs.shape[1], color="k", lw=0.8, ls="--")
    bar.set_xticks(range(probs.shape[1]))
    bar.tick_params(labelsize=6)
    bar.set_xlabel("memory item", fontsize=7)
    bar.set_ylabel("mean usage", fontsize=7)
  if image is not None:
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="matching probability")
  return _save(fig, path)


def norm_change_figure(path: str, frames: np.ndarray, change: np.ndarray,
                       titles: Sequence[str]) -> str:
  """frames uint8 (K, L, H, W, 3), change (K, L, h, w) = ||f_s|| - ||f_o||, upsampled over
  each frame with a diverging colormap centred on 0 (blue: the memory lowered the norm)."""
  k, length, height, width = frames.shape[:4]
  lim = float(np.abs(change).max()) or 1.0
  fig = _figure(1.1 * length + 1.0, 2.2 * k)
  axes = fig.subplots(k, length, squeeze=False)
  image = None
  for r in range(k):
    for c in range(length):
      ax = axes[r, c]
      ax.imshow(frames[r, c])
      image = ax.imshow(change[r, c], cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6,
                        interpolation="bilinear",
                        extent=(-0.5, width - 0.5, height - 0.5, -0.5))
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_title(titles[r], fontsize=7, loc="left")
  fig.colorbar(image, ax=fig.axes, shrink=0.7, label="||f_s|| - ||f_o||")
  return _save(fig, path)


def temporal_weights_figure(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """One block per tracklet: its frames, and below them the temporal weight of each frame in
  its clip (bars; dashed: uniform 1/L), distractor frames shaded red. `rows`: dicts with
  `title`, `frames` uint8 (T, H, W, 3), `weights` (T,) (NaN where a frame is in no clip),
  `flagged` (T,) bool, `seq_len`."""
  fig = _figure(max(6.0, 0.45 * max(len(r["weights"]) for r in rows) + 1.0), 2.4 * len(rows))
  grid = fig.add_gridspec(2 * len(rows), 1, height_ratios=(2, 1) * len(rows), hspace=0.35)
  for i, row in enumerate(rows):
    t = len(row["weights"])
    montage = np.concatenate(list(row["frames"]), axis=1)
    top = fig.add_subplot(grid[2 * i])
    top.imshow(montage, extent=(-0.5, t - 0.5, 0, 2.0), aspect="auto")
    top.set_xlim(-0.5, t - 0.5)
    top.set_xticks([])
    top.set_yticks([])
    top.set_title(row["title"], fontsize=8, loc="left")
    bottom = fig.add_subplot(grid[2 * i + 1], sharex=top)
    for f in np.flatnonzero(row["flagged"]):
      for ax in (top, bottom):
        ax.axvspan(f - 0.5, f + 0.5, color="tab:red", alpha=0.25, lw=0)
    bottom.bar(np.arange(t), np.nan_to_num(row["weights"]), color="tab:blue", width=0.7)
    bottom.axhline(1.0 / row["seq_len"], color="k", lw=0.8, ls="--")
    for b in range(row["seq_len"], t, row["seq_len"]):
      bottom.axvline(b - 0.5, color="grey", lw=0.5)
    bottom.set_ylim(0, max(1.0 / row["seq_len"] * 2, float(np.nanmax(row["weights"])) * 1.1))
    bottom.set_ylabel("weight", fontsize=7)
    bottom.tick_params(labelsize=6)
  bottom.set_xlabel("frame (grey lines: clip boundaries; red: distractor frames)", fontsize=7)
  return _save(fig, path)


def curves_figure(path: str, runs: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                  steps_per_epoch: int | None = None) -> str:
  """Loss terms (left) and mAP (right) over steps of one or more runs ({label: scalars})."""
  fig = _figure(11.0, 3.8)
  left, right = fig.subplots(1, 2)
  styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
  # One colour per tag over all runs; runs differ by line style / marker.
  losses = sorted({t for s in runs.values() for t in loss_tags(s)})
  maps = sorted({t for s in runs.values() for t in s if t.endswith("_mAP")})
  suffix = lambda label: f" ({label})" if len(runs) > 1 else ""
  for r, (label, scalars) in enumerate(runs.items()):
    for tag in loss_tags(scalars):
      steps, values = scalars[tag]
      left.plot(steps, values, styles[r % len(styles)], color=f"C{losses.index(tag)}", lw=1.0,
                label=tag[len("train_"):] + suffix(label))
    for tag in (t for t in maps if t in scalars):
      steps, values = scalars[tag]
      right.plot(steps, values, styles[r % len(styles)], marker=markers[r % len(markers)], ms=4,
                 color=f"C{maps.index(tag)}", label=tag + suffix(label))
  unit = f"step ({steps_per_epoch} steps / epoch)" if steps_per_epoch else "step"
  left.set_title("training loss terms", fontsize=9)
  right.set_title("mAP", fontsize=9)
  for ax in (left, right):
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  return _save(fig, path)
