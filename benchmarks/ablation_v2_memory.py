"""Ablation v2 (issue 17): what the memories do during training, and the pretrained trunk file.

`memory_stats_at(state, ...)` runs consecutive clips of a fixed set of test tracklets through
the model (eval mode) and returns, with the number helpers of `stmn_jax.visualize`:
- `spatial_entropy` / `temporal_entropy`: addressing entropy / log M (N) over every location
  (clip), 1 = uniform addressing (`visualize.memory_stats`), with the mean top-1 probability;
- `weight_contrast`: L x (mean weight of a clean frame - mean weight of a distractor frame) in
  clips that hold both (`visualize.distractor_weight_stats`, the sidecar's per-frame flags):
  0 = the temporal memory ignores the distractors, > 0 = it down-weights them (1 = by a whole
  uniform share);
- `readout_ratio`: mean over locations of ||BN(read-out)|| over mean ||f_o||, where the spatial
  memory's output is f_s = f_o - BN(read-out) (`models/memory.py`), so ||f_o - f_s|| is the
  read-out's size: 0 = the memory changes nothing.

`export_trunk(model, path)` writes the stem, layer1-3 (`trunk`) and the value stage (as
`layer4`) of a trained STMN-family model as a torchvision-keyed state dict, the format
`config.model.pretrained` loads (`models.load_pretrained`, `torchvision_weights`), so the same
file can start any STMN variant (every `ResNetStage` gets layer4, as from ImageNet weights).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from stmn_jax import figures
from stmn_jax import sharding
from stmn_jax import visualize
from stmn_jax.models import torchvision_weights

STAT_KEYS = ("spatial_entropy", "temporal_entropy", "weight_contrast", "readout_ratio")


def make_stats_forward(state, mesh):
  """Jitted (model_state, frames (B, L, H, W, 3)) -> memory probabilities, frame weights and,
  per frame, the mean ||f_o - f_s|| and mean ||f_o|| over locations."""
  model_def = state.model_def_eval

  def forward(model_state, frames):
    model = nnx.merge(model_def, model_state)
    out = model(frames, return_maps=True)
    res = {k: out[k].astype(jnp.float32) for k in visualize.FORWARD_KEYS if k in out}
    value = out["value_maps"].astype(jnp.float32)
    change = value - out["refined_maps"].astype(jnp.float32)
    res["readout_norm"] = jnp.linalg.norm(change, axis=-1).mean(axis=(-2, -1))  # (B, L)
    res["value_norm"] = jnp.linalg.norm(value, axis=-1).mean(axis=(-2, -1))
    return res

  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(forward, in_shardings=(rep, dat), out_shardings=dat)


def pick_tracklets(tracklets: Sequence[Any], meta: Sequence[Mapping[str, Any] | None] | None,
                   count: int, seq_len: int, seed: int = 0) -> list[int]:
  """`count` tracklets of real identities with >= L frames (those with temporal distractors
  first, so the weight contrast has clips to average), the same for every run of a family."""
  rng = np.random.default_rng(seed)
  ok = [i for i, t in enumerate(tracklets) if t.pid > 0 and t.num_frames >= seq_len
        and (meta is None or (meta[i] is not None and meta[i].get("kind") == "person"))]
  flagged = [i for i in ok if meta is not None and meta[i]["distractors"]]
  rest = [i for i in ok if i not in set(flagged)]
  picks = [flagged[j] for j in rng.permutation(len(flagged))][:count]
  picks += [rest[j] for j in rng.permutation(len(rest))][:count - len(picks)]
  return sorted(picks)


def memory_stats_at(state, config, mesh, forward, tracklets: Sequence[Any],
                    meta: Sequence[Mapping[str, Any] | None] | None,
                    ids: Sequence[int]) -> dict[str, Any]:
  """The statistics of the module docstring for `state` on `tracklets[ids]` (None where the
  model lacks the memory or no clip mixes distractor and clean frames)."""
  model = state.model()
  has_sm = bool(getattr(model, "use_spatial", False))
  has_tm = bool(getattr(model, "use_temporal", False))
  t_idx, frames, out = visualize.clip_pass(state.model_state, forward, tracklets, ids, config,
                                           mesh)
  res: dict[str, Any] = {"clips": int(len(t_idx)), "spatial_entropy": None,
                         "spatial_top1": None, "temporal_entropy": None, "temporal_top1": None,
                         "weight_contrast": None, "weight_clips": 0, "readout_ratio": None}
  if has_sm and "spatial_probs" in out:
    s = visualize.memory_stats(out["spatial_probs"])
    res.update(spatial_entropy=s["normalized_entropy"], spatial_top1=s["mean_max_prob"],
               spatial_perplexity=s["usage_perplexity"])
    res["readout_ratio"] = float(out["readout_norm"].mean() / max(out["value_norm"].mean(),
                                                                   1e-12))
  if has_tm and "temporal_probs" in out:
    s = visualize.memory_stats(out["temporal_probs"])
    res.update(temporal_entropy=s["normalized_entropy"], temporal_top1=s["mean_max_prob"],
               temporal_perplexity=s["usage_perplexity"])
    if meta is not None:
      w = visualize.distractor_weight_stats(out["frame_weights"], frames, t_idx, meta,
                                            kinds=("any",))["any"]
      res["weight_clips"] = w["clips"]
      if w["clips"]:
        length = out["frame_weights"].shape[1]
        res["weight_contrast"] = float(length * (w["mean_weight_clean"]
                                                 - w["mean_weight_flagged"]))
        res["weight_flagged"], res["weight_clean"] = (w["mean_weight_flagged"],
                                                      w["mean_weight_clean"])
  return res


# ------------------------------------------------------------------------------ trunk file
def trunk_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """torchvision keys -> arrays of `model.trunk` (stem, layer1-3) and `model.value_stage`
  (layer4), the inverse of `torchvision_weights.load_into_trunk` / `load_into_stage`."""
  entries = torchvision_weights.trunk_entries(model.trunk)
  entries += torchvision_weights.stage_entries(model.value_stage, "layer4")
  out = {}
  for key, variable, kind in entries:
    value = np.asarray(jax.device_get(variable.get_value()), np.float32)
    out[key] = value.transpose(3, 2, 0, 1) if kind == "conv" else value  # (O, I, kh, kw)
  return out


def export_trunk(model: nnx.Module, path: str) -> str:
  """Writes `trunk_state_dict(model)` to `path` (.npz or .safetensors) atomically."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"tmp.{os.getpid()}.{path.name}"
  torchvision_weights.save_state_dict(trunk_state_dict(model), os.fspath(tmp))
  tmp.replace(path)
  return os.fspath(path)


# ------------------------------------------------------------------------------ figure
STAT_LABELS = {"spatial_entropy": "SM entropy / log M", "temporal_entropy": "TM entropy / log N",
               "weight_contrast": "L (w_clean - w_distractor)",
               "readout_ratio": "||BN(read-out)|| / ||f_o||"}


def stats_figure(path: str, series: Mapping[str, Sequence[Mapping[str, Any]]],
                 title: str = "") -> str:
  """One panel per statistic of `STAT_KEYS`, one line per run label ({label: [stats records
  with a "step"]}), the way `figures` draws its panels."""
  fig = figures._figure(12.0, 3.0)  # pylint: disable=protected-access
  axes = fig.subplots(1, len(STAT_KEYS))
  for k, ax in zip(STAT_KEYS, axes):
    for i, (label, recs) in enumerate(series.items()):
      pts = [(r["step"], r[k]) for r in recs if r.get(k) is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, ("-", "--", ":", "-.")[i // 10 % 4], color=f"C{i % 10}", lw=1.0,
                marker="o", ms=3, label=label)
    ax.set_title(STAT_LABELS[k], fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  seen: dict[str, Any] = {}  # every run's line once, whichever panels it appears in
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      seen.setdefault(label, handle)
  if seen:
    order = [x for x in series if x in seen]
    axes[-1].legend([seen[x] for x in order], order, fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  return figures._save(fig, path)  # pylint: disable=protected-access
