"""Inference, shared by every mode: restore a model, embed tracklets, `prepare(config, workdir)`.

- `restore_model`: the best / latest training checkpoint of a workdir, else the parameters
  `--mode=export` wrote (`W/export/params`); a checkpoint of another model is refused, naming
  the first differing keys and shapes, before orbax reads it.
- `embed_tracklets`: (T, D) float32 tracklet embeddings under every `config.eval.sampling`:
  "rrs" / "all_frames" embed clips (`embedding.make_embed_fn`) and average them per tracklet
  (`pooling.extract_features`); "whole" runs one attention pass over every frame of each
  tracklet (models with the whole-tracklet protocol, `embedding.py`).
- `prepare`: the set-up of the modes that start from a trained workdir (checks, mesh, data,
  restore) in one call; the data may be another dataset's (cross-dataset evaluation).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from data_pipelines import pipeline
from stmn_jax import checkpoints
from stmn_jax import embedding
from stmn_jax import errors
from stmn_jax import models
from stmn_jax import pooling
from stmn_jax import run_setup
from stmn_jax import sharding
from stmn_jax import train_state as train_state_lib
from stmn_jax import workdir_io

Embedder = Callable | embedding.WholeTrackletFns


# ------------------------------------------------------------------------------ paths
# A workdir may be local or `gs://...`: its paths are `epath.Path`s (`workdir_io`), given to
# orbax as they are.
def export_dir(workdir: str) -> str:
  return str(workdir_io.workdir_path(workdir) / "export")


def params_dir(workdir: str) -> str:
  return str(workdir_io.workdir_path(workdir) / "export" / "params")


# ------------------------------------------------------------------------------ tree checks
def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{"a/b/0": shape}` of every leaf (arrays or orbax metadata with a `.shape`)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    out[key] = tuple(getattr(leaf, "shape", np.shape(leaf)))
  return out


def check_tree_matches(saved: Any, target: Any, source: str) -> None:
  """Raises a CheckpointMismatchError (a ValueError) when `saved` (a checkpoint's tree
  metadata) does not fit `target`.

  Names the first missing / unexpected keys and shape mismatches, and `source` (the path).
  """
  s, t = _flat_shapes(saved), _flat_shapes(target)
  missing = sorted(set(t) - set(s))
  extra = sorted(set(s) - set(t))
  shapes = [(k, s[k], t[k]) for k in sorted(set(s) & set(t)) if s[k] != t[k]]
  if not (missing or extra or shapes):
    return
  parts = []
  if missing:
    parts.append(f"{len(missing)} keys missing from the checkpoint (e.g. {missing[:3]})")
  if extra:
    parts.append(f"{len(extra)} keys the model does not have (e.g. {extra[:3]})")
  if shapes:
    k, a, b = shapes[0]
    parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {a}, model {b})")
  raise errors.CheckpointMismatchError(
      f"checkpoint {source} does not match the configured model "
      f"(config.model.name / preset / depth / width): " + "; ".join(parts)
  )


def saved_tree_metadata(path: str) -> Any:
  """The tree of array metadata (`.shape`, `.dtype`) of the orbax checkpoint at `path`."""
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if tree is None or "model" not in tree:
    raise errors.CheckpointMismatchError(
        f"{path}: expected an orbax checkpoint holding a 'model' tree")
  return tree


# ------------------------------------------------------------------------------ parameters
def save_params(path: str, model_state: Any) -> str:
  """Writes `{"model": pure dict of model_state}` as an orbax checkpoint at `path`."""
  path = str(workdir_io.workdir_path(path))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"model": nnx.to_pure_dict(model_state)}, force=True)
  return path


def load_params(path: str, model_state: Any) -> Any:
  """A copy of `model_state` (nnx.State, placed) with the values of the checkpoint at `path`."""
  path = str(workdir_io.workdir_path(path))
  target = {"model": nnx.to_pure_dict(model_state)}
  check_tree_matches(saved_tree_metadata(path)["model"], target["model"], path)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, target)
  new_state = jax.tree.map(lambda x: x, model_state)
  nnx.replace_by_pure_dict(new_state, restored["model"])
  return new_state


# ------------------------------------------------------------------------------ restore
def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """Raises CheckpointNotFoundError (a FileNotFoundError) naming `workdir` when it holds
  nothing to restore."""
  if not workdir or not epath.Path(workdir).is_dir():
    raise errors.CheckpointNotFoundError(f"{flag}={workdir}: no such workdir (train first)")
  places = [epath.Path(workdir) / p for p in ("checkpoints", "best", "export/params")]
  if not any(p.is_dir() and any(p.iterdir()) for p in places):
    raise errors.CheckpointNotFoundError(
        f"{flag}={workdir}: no checkpoint (expected one of {', '.join(map(str, places))}; "
        "train first)")


def _abstract_model_tree(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """The pure-dict state of `config.model` for `num_classes`, as shapes only (nothing runs)."""
  model = nnx.eval_shape(
      lambda: models.create_model(config, num_classes, nnx.Rngs(0), load_weights=False))
  return nnx.to_pure_dict(nnx.state(model))


def num_classes_in(config: ml_collections.ConfigDict, saved_model: Any, source: str) -> int:
  """The training identities a saved model tree was built for: the size of the classifier
  axis, i.e. of the one axis that changes with `num_classes` in the configured model."""
  a, b = _flat_shapes(_abstract_model_tree(config, 2)), _flat_shapes(_abstract_model_tree(
      config, 3))
  saved = _flat_shapes(saved_model)
  for key in sorted(a):
    if a[key] != b[key] and key in saved and len(saved[key]) == len(a[key]):
      axis = next(i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y)
      return int(saved[key][axis])
  raise errors.CheckpointMismatchError(
      f"checkpoint {source}: cannot tell its number of training identities (no classifier of "
      f"config.model.name={config.model.name!r} in it)")


def _restore_model_fn(config, num_classes, rngs):
  """The registry model without its ImageNet weights: a restore overwrites every parameter."""
  return models.create_model(config, num_classes, rngs, load_weights=False)


def restore_model(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None,
    which: str | None = None, num_classes: int | None = None,
) -> tuple[train_state_lib.TrainState, str, int | None]:
  """(TrainState with the restored model, label, step or None).

  Tries the best / latest training checkpoint (`which` defaults to `config.eval.checkpoint`),
  then `W/export/params`. `num_classes` defaults to the classifier width saved in the
  checkpoint, so no dataset is needed.

  Raises CheckpointNotFoundError (a FileNotFoundError) when there is neither;
  CheckpointMismatchError (a ValueError) when the tree does not fit.
  """
  run_setup.check_config(config)
  mesh = mesh or sharding.make_mesh()
  if not epath.Path(workdir).is_dir():
    raise errors.CheckpointNotFoundError(f"workdir {workdir} does not exist (train first)")
  which = which or config.eval.checkpoint
  with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
    if which == "best" and ckpt.best_step() is None:
      if ckpt.latest_step() is not None:
        logging.warning("no best checkpoint in %s; using the latest", ckpt.best_dir)
      which = "latest"
    step = ckpt.best_step() if which == "best" else ckpt.latest_step()
    if step is not None:
      source = str(epath.Path(ckpt.best_dir if which == "best" else ckpt.latest_dir) / str(step))
      saved = saved_tree_metadata(str(epath.Path(source) / "default"))
    elif epath.Path(params_dir(workdir)).is_dir():
      source = params_dir(workdir)
      saved = saved_tree_metadata(source)
    else:
      raise errors.CheckpointNotFoundError(
          f"no checkpoint in {workdir}/checkpoints, {workdir}/best or {params_dir(workdir)} "
          f"(train first)")
    if num_classes is None:
      num_classes = num_classes_in(config, saved["model"], source)
    spe = run_setup.num_steps_per_epoch(config, num_classes)
    state, _ = train_state_lib.create_train_state(config, num_classes, spe, mesh,
                                                  _restore_model_fn)
    target = state.checkpoint_tree()
    check_tree_matches(saved["model"], target["model"], source)
    if step is not None:
      state.load_checkpoint_tree(ckpt.restore(target, which))
      return state, f"{which} checkpoint (step {step})", step
  state.model_state = load_params(source, state.model_state)
  return state, f"exported parameters {source}", None


@dataclasses.dataclass
class Prepared:
  """A checked run set-up with the restored model of a workdir."""

  setup: run_setup.RunSetup
  state: train_state_lib.TrainState
  checkpoint: str  # what was restored, e.g. "best checkpoint (step 8)"
  step: int | None

  @property
  def mesh(self) -> Mesh:
    return self.setup.mesh


def prepare(
    config: ml_collections.ConfigDict, workdir: str, *, read_data: bool = True,
    which: str | None = None, flag: str = "--workdir",
    data_config: ml_collections.ConfigDict | None = None,
) -> Prepared:
  """The shared set-up of eval, export, extract, search and visualize: checks the config and
  `workdir` (`flag` names it in errors), makes the mesh, reads the dataset (`read_data`),
  restores the model (`which`: "best" / "latest", default `config.eval.checkpoint`). Only the
  test tracklets' frames are checked up front: these modes read no others.

  `data_config` (cross-dataset evaluation, `eval_mode`): the config whose dataset is read
  instead of `config`'s. The model is still `config`'s, and its number of training identities
  is read from the checkpoint (the other dataset's training ids say nothing about it), so
  `setup.num_classes` is None then.
  """
  check_workdir(workdir, flag)
  setup = run_setup.prepare_run(data_config or config, read_data=read_data, frames_of="test")
  if data_config is not None:
    setup.num_classes = None
  state, label, step = restore_model(config, workdir, setup.mesh, which, setup.num_classes)
  return Prepared(setup=setup, state=state, checkpoint=label, step=step)


# ------------------------------------------------------------------------------ embedding
def make_embedder(state: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> Embedder:
  """The compiled-once embedding function(s) of `config.eval.sampling`; fails at once for
  "whole" on a model without the whole-tracklet protocol."""
  run_setup.check_eval_sampling(config)
  if config.eval.sampling == "whole":
    return embedding.make_whole_tracklet_fns(state, config, mesh)
  return embedding.make_embed_fn(state, mesh, config.eval.flip)


def with_progress(batches, total: int, label: str, every: int | None = None,
                  log: Callable[..., Any] = logging.info):
  """Yields `batches`, logging `label: batch i/total, elapsed, ETA` about ten times."""
  every = every or max(1, total // 10)
  start = time.time()
  for i, batch in enumerate(batches, 1):
    yield batch
    if i % every == 0 or i == total:
      elapsed = time.time() - start
      log("%s: batch %d/%d, %.1f s elapsed, ETA %.1f s", label, i, total, elapsed,
          elapsed / i * max(total - i, 0))


def embed_tracklets(
    state: Any, tracklets: Sequence[Any], config: ml_collections.ConfigDict, mesh: Mesh,
    embedder: Embedder | None = None, progress: bool = False,
) -> np.ndarray:
  """(T, D) float32 embeddings of `tracklets` under `config.eval.sampling` (module docstring).

  `embedder` comes from `make_embedder` (built here when None); `progress` logs batches / ETA.
  """
  embedder = embedder or make_embedder(state, config, mesh)
  if config.eval.sampling == "whole":
    return whole_tracklet_features(state, embedder, tracklets, config, mesh, progress)
  batches = pipeline.eval_iterator(
      tracklets, config, sampling=config.eval.sampling, clips=config.eval.clips
  )

  def global_embed(frames):  # host-local frames -> global (B, D); extract_features gathers
    frames = sharding.global_batch({"frames": frames}, mesh)["frames"]
    return embedder(state.model_state, frames)

  if progress:
    batches = with_progress(batches, batches.num_batches, f"embedding {len(tracklets)} tracklets")
  return np.asarray(pooling.extract_features(global_embed, batches, len(tracklets)), np.float32)


# ------------------------------------------------------------------------------ whole tracklets
def _global_rows(x: Any) -> np.ndarray:
  """A host-local or global batch array -> NumPy rows of the global batch (process order)."""
  if isinstance(x, jax.Array) and x.is_fully_addressable:
    return np.asarray(x)
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def whole_tracklet_features(
    state: Any,
    fns: embedding.WholeTrackletFns,
    tracklets: Sequence[Any],
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    progress: bool = False,
) -> np.ndarray:
  """One attention pass over all frames of each tracklet -> (T, D) float32.

  Every tracklet is cut into consecutive chunks of `fns.chunk` frames (the last one padded and
  its padding masked); each chunk is reduced on device to a summary of fixed size; the chunks
  of a tracklet are merged on the host in time order (`fns.merge`) and, once all are in, the
  tracklet is embedded in fixed-size batches. Host memory: O(chunks in flight + T x D),
  whatever the tracklet lengths. With `config.eval.flip` the embedding is the mean of both
  views'.
  """
  chunk, num = fns.chunk, len(tracklets)
  sub = config.copy_and_resolve_references()
  sub.data.seq_len = chunk
  sub.data.eval_batch_size = fns.rows
  batches = pipeline.eval_iterator(tracklets, sub, sampling="all_frames", clips="consecutive")
  plan = batches.plan
  # consecutive clips repeat the last frame: a position is real iff it continues the run
  frame_mask = (plan.frames == plan.frames[:, :1] + np.arange(chunk)) & plan.mask[:, None]
  local_mask = frame_mask[plan.host_rows(jax.process_index())].reshape(
      plan.num_batches, plan.local_batch, chunk)
  expected = np.bincount(plan.tracklet[plan.mask], minlength=num)
  seen = np.zeros(num, np.int64)
  open_: dict[int, tuple] = {}
  done: list[tuple[int, tuple]] = []
  feats = np.zeros((num, 0), np.float32)
  head_rows = fns.rows

  def flush(final: bool) -> None:
    nonlocal feats
    while len(done) >= head_rows or (final and done):
      part, rest = done[:head_rows], done[head_rows:]
      done[:] = rest
      idx = np.asarray([t for t, _ in part])
      pad = head_rows - len(part)
      embs = []
      for view in range(len(part[0][1])):
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *[s[view] for _, s in part])
        stacked = jax.tree.map(
            lambda a: np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]), stacked)
        out = fns.embed(state.model_state, stacked)
        embs.append(np.asarray(out.addressable_data(0))[:len(part)])
      emb = np.mean(embs, axis=0).astype(np.float32)
      if feats.shape[1] == 0:
        feats = np.zeros((num, emb.shape[1]), np.float32)
      feats[idx] = emb

  if progress:
    batches = with_progress(batches, batches.num_batches, f"embedding {num} whole tracklets")
  for i, batch in enumerate(batches):
    g = sharding.global_batch({"frames": batch["frames"], "mask": local_mask[i]}, mesh)
    views = jax.tree.map(_global_rows, fns.summarize(state.model_state, g["frames"], g["mask"]))
    index = _global_rows(np.asarray(batch["tracklet_index"]))
    valid = _global_rows(np.asarray(batch["mask"]).astype(bool))
    for r in np.flatnonzero(valid):
      t = int(index[r])
      row = tuple(jax.tree.map(lambda a: np.asarray(a[r]), v) for v in views)
      if t in open_:
        row = tuple(fns.merge(a, b) for a, b in zip(open_[t], row))
      seen[t] += 1
      if seen[t] == expected[t]:
        open_.pop(t, None)
        done.append((t, row))
      else:
        open_[t] = row
    flush(final=False)
  flush(final=True)
  missing = np.flatnonzero(seen != expected)
  if open_ or missing.size or (num and feats.shape[1] == 0):
    raise RuntimeError(
        f"whole-tracklet evaluation: tracklets {missing[:5].tolist()} got {seen[missing[:5]]} "
        f"of {expected[missing[:5]]} chunks")
  return feats
