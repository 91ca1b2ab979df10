"""Export of a trained model: TensorFlow SavedModel, inference-parameter checkpoint, features.

Modes (registered in `stmn_jax.app.MODES`):
- `--mode=export`: restores the best (or latest: `config.eval.checkpoint`) training checkpoint
  and writes
  - `W/export/saved_model` (or `--export_dir`): a SavedModel through orbax-export whose
    `serving_default` signature maps uint8 frames `(batch, L, H, W, 3)` (batch free) to the
    retrieval embedding `(batch, D)` float32; normalisation (and the flip average when
    `config.eval.flip`) happens inside;
  - `W/export/params`: an orbax checkpoint of the eval-mode model state alone (`{"model": ...}`,
    no optimizer), which `--mode=eval` uses when the workdir has no training checkpoint.
- `--mode=extract`: embeddings of a split (or of a folder of frame folders) to `.npy` plus an
  index CSV (see `extract_mode`).

A checkpoint whose tree does not match the configured model (another model, other width, ...)
is refused before orbax reads it, with the first differing keys / shapes named.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from stmn_jax import app
from stmn_jax import sharding

SIGNATURE = "serving_default"
INPUT_NAME = "frames"
OUTPUT_NAME = "embedding"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


# ------------------------------------------------------------------------------ paths
def export_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "export")


def default_saved_model_dir(workdir: str) -> str:
  return os.path.join(export_dir(workdir), "saved_model")


def params_dir(workdir: str) -> str:
  return os.path.join(export_dir(workdir), "params")


# ------------------------------------------------------------------------------ tree checks
def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{"a/b/0": shape}` of every leaf (arrays or orbax metadata with a `.shape`)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    out[key] = tuple(getattr(leaf, "shape", np.shape(leaf)))
  return out


def check_tree_matches(saved: Any, target: Any, source: str) -> None:
  """Raises a ValueError when `saved` (a checkpoint's tree metadata) does not fit `target`.

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
  raise ValueError(
      f"checkpoint {source} does not match the configured model "
      f"(config.model.name / preset / depth / width): " + "; ".join(parts)
  )


def saved_tree_metadata(path: str) -> Any:
  """The tree of array metadata (`.shape`, `.dtype`) of the orbax checkpoint at `path`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if tree is None or "model" not in tree:
    raise ValueError(f"{path}: expected an orbax checkpoint holding a 'model' tree")
  return tree


# ------------------------------------------------------------------------------ restore
def restore_model(
    config: ml_collections.ConfigDict, workdir: str, mesh=None, which: str | None = None,
    num_classes: int | None = None,
):
  """(TrainState with the restored model, label, step or None).

  Tries the best / latest training checkpoint (`which` defaults to `config.eval.checkpoint`),
  then `W/export/params`.

  Raises FileNotFoundError when there is neither; ValueError when the tree does not fit.
  """
  from stmn_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from stmn_jax import train  # pylint: disable=g-import-not-at-top

  train.check_config(config)
  mesh = mesh or sharding.make_mesh()
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist (train first)")
  if num_classes is None:
    train_split, _, _, _ = train.load_data(config)
    num_classes = len({t.pid for t in train_split.train})
  spe = train.num_steps_per_epoch(config, num_classes)
  state, _ = train.create_train_state(config, num_classes, spe, mesh)
  which = which or config.eval.checkpoint
  with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
    if which == "best" and ckpt.best_step() is None:
      if ckpt.latest_step() is not None:
        logging.warning("no best checkpoint in %s; using the latest", ckpt.best_dir)
      which = "latest"
    step = ckpt.best_step() if which == "best" else ckpt.latest_step()
    if step is not None:
      directory = os.path.join(ckpt.best_dir if which == "best" else ckpt.latest_dir, str(step))
      target = state.checkpoint_tree()
      saved = saved_tree_metadata(os.path.join(directory, "default"))
      check_tree_matches(saved["model"], target["model"], directory)
      state.load_checkpoint_tree(ckpt.restore(target, which))
      return state, f"{which} checkpoint (step {step})", step
  if os.path.isdir(params_dir(workdir)):
    state.model_state = load_params(params_dir(workdir), state.model_state)
    return state, f"exported parameters {params_dir(workdir)}", None
  raise FileNotFoundError(
      f"no checkpoint in {workdir}/checkpoints, {workdir}/best or {params_dir(workdir)} "
      f"(train first)"
  )


def save_params(path: str, model_state: Any) -> str:
  """Writes `{"model": pure dict of model_state}` as an orbax checkpoint at `path`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"model": nnx.to_pure_dict(model_state)}, force=True)
  return path


def load_params(path: str, model_state: Any) -> Any:
  """A copy of `model_state` (nnx.State, placed) with the values of the checkpoint at `path`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  target = {"model": nnx.to_pure_dict(model_state)}
  check_tree_matches(saved_tree_metadata(path)["model"], target["model"], path)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, target)
  new_state = jax.tree.map(lambda x: x, model_state)
  nnx.replace_by_pure_dict(new_state, restored["model"])
  return new_state


# ------------------------------------------------------------------------------ inference fn
def make_inference_fn(
    model_def_eval: Any, treedef: Any, config: ml_collections.ConfigDict
) -> Callable[[Mapping[str, jax.Array], jax.Array], jax.Array]:
  """`(flat params {name: array}, uint8 frames (B, L, H, W, 3)) -> embedding (B, D) float32`.

  Frames are scaled to [0, 1] and normalised with `config.data.mean / std` (as the eval
  pipeline); with `config.eval.flip` the embedding averages the clip and its mirror.
  """
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  flip = bool(config.eval.flip)

  def fn(params: Mapping[str, jax.Array], frames: jax.Array) -> jax.Array:
    leaves = [params[k] for k in sorted(params)]
    state = jax.tree.unflatten(treedef, leaves)
    model = nnx.merge(model_def_eval, state)
    x = (frames.astype(jnp.float32) * (1.0 / 255.0) - mean) / std
    emb = model(x)["embedding"]
    if flip:
      emb = 0.5 * (emb + model(jnp.flip(x, axis=3))["embedding"])
    return emb.astype(jnp.float32)

  return fn


def flat_params(model_state: Any) -> tuple[dict[str, np.ndarray], Any]:
  """nnx.State -> ({"p0000": array, ...} in leaf order, treedef) for `make_inference_fn`."""
  leaves, treedef = jax.tree.flatten(model_state)
  width = max(4, len(str(len(leaves))))
  params = {f"p{i:0{width}d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
  return params, treedef


def export_saved_model(
    state, config: ml_collections.ConfigDict, path: str,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> str:
  """Writes the eval-mode model of `state` as a SavedModel at `path` (signature
  `serving_default`: `frames` uint8 `(None, L, H, W, 3)` -> `embedding` float32 `(None, D)`),
  lowered for `platforms` (the SavedModel runs only on those). Only process 0 writes.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from orbax.export import ExportManager  # pylint: disable=g-import-not-at-top
  from orbax.export import JaxModule  # pylint: disable=g-import-not-at-top
  from orbax.export import ServingConfig  # pylint: disable=g-import-not-at-top

  d = config.data
  L, H, W = int(d.seq_len), int(d.height), int(d.width)
  params, treedef = flat_params(state.model_state)
  fn = make_inference_fn(state.model_def_eval, treedef, config)
  module = JaxModule(
      params, fn, trainable=False, input_polymorphic_shape="b, ...",
      jax2tf_kwargs={"native_serialization_platforms": tuple(platforms)},
  )
  serving = ServingConfig(
      SIGNATURE,
      input_signature=[tf.TensorSpec([None, L, H, W, 3], tf.uint8, name=INPUT_NAME)],
      tf_postprocessor=lambda emb: {OUTPUT_NAME: emb},
  )
  path = os.path.abspath(path)
  if jax.process_index() == 0:
    ExportManager(module, [serving]).save(path)
  return path


@app.register_mode("export")
def export_mode(
    config: ml_collections.ConfigDict, workdir: str,
    export_dir: str | None = None,  # pylint: disable=redefined-outer-name
) -> dict:
  """Restores the best / latest checkpoint; writes the SavedModel and `W/export/params`."""
  state, label, _ = restore_model(config, workdir)
  saved_model = export_saved_model(state, config, export_dir or default_saved_model_dir(workdir))
  params = save_params(params_dir(workdir), state.model_state)
  d = config.data
  print(f"\nExported {label}:\n  SavedModel {saved_model} (uint8 frames "
        f"(batch, {d.seq_len}, {d.height}, {d.width}, 3) -> embedding)\n  parameters {params}",
        flush=True)
  logging.info("exported %s to %s and %s", label, saved_model, params)
  return {"mode": "export", "checkpoint": label, "saved_model": saved_model, "params": params}


# ------------------------------------------------------------------------------ extract
INDEX_COLUMNS = ("tracklet", "pid", "camera", "num_frames", "first_frame")
FOLDER_CSV = "tracklets.csv"


def _read_folder_labels(path: str) -> dict[str, tuple[int, int]]:
  """`tracklets.csv` (columns tracklet, pid, camera) -> {tracklet: (pid, camera)}."""
  labels = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    need = {"tracklet", "pid", "camera"}
    if reader.fieldnames is None or not need <= set(reader.fieldnames):
      raise ValueError(f"{path}: expected a header with columns tracklet, pid, camera; got "
                       f"{reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
      try:
        labels[row["tracklet"]] = (int(row["pid"]), int(row["camera"]))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{path} line {line}: pid and camera must be integers, got "
                         f"{row}") from e
  return labels


def _check_frame(path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      image.load()
  except Exception as e:  # PIL raises several types for bad files
    raise ValueError(f"unreadable frame {path}: {e}") from e


def read_folder(input_dir: str, verify: bool = True) -> tuple[list[str], list[Any]]:
  """(names, tracklets) of `input_dir`: one sub-folder of frames (JPEG / PNG / BMP) per tracklet.

  Frames are sorted by file name. An optional `input_dir/tracklets.csv` (tracklet, pid, camera)
  gives labels; unlabelled tracklets get pid -1, camera -1. Errors name the empty folder, the
  unreadable frame (`verify` decodes every frame) or the CSV row.
  """
  from data_pipelines import tracklets as tracklets_lib  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"--input_dir={input_dir}: not a folder")
  csv_path = os.path.join(input_dir, FOLDER_CSV)
  labels = _read_folder_labels(csv_path) if os.path.isfile(csv_path) else {}
  names = sorted(n for n in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, n)))
  if not names:
    raise ValueError(f"--input_dir={input_dir}: no sub-folders (expected one per tracklet)")
  unknown = sorted(set(labels) - set(names))
  if unknown:
    raise ValueError(f"{csv_path}: tracklets {unknown[:5]} have no folder in {input_dir}")
  out = []
  for name in names:
    folder = os.path.join(input_dir, name)
    frames = sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
    )
    if not frames:
      raise ValueError(f"tracklet folder {folder} has no frames (expected "
                       f"{', '.join(IMAGE_EXTENSIONS)} files)")
    if verify:
      for frame in frames:
        _check_frame(frame)
    pid, camid = labels.get(name, (-1, -1))
    out.append(tracklets_lib.Tracklet(frames=tuple(frames), pid=pid, camid=camid))
  return names, out


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


def embed_tracklets(state, tracklets: Sequence[Any], config: ml_collections.ConfigDict,
                    mesh) -> np.ndarray:
  """(T, D) float32 tracklet embeddings through the eval pipeline (clips pooled per tracklet)."""
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  from stmn_jax import evaluation  # pylint: disable=g-import-not-at-top
  from stmn_jax import train  # pylint: disable=g-import-not-at-top

  embed_fn = train.make_embed_fn(state, mesh, config.eval.flip)
  batches = pipeline.eval_iterator(
      tracklets, config, sampling=config.eval.sampling, clips=config.eval.clips
  )

  def global_embed(frames):
    frames = sharding.global_batch({"frames": frames}, mesh)["frames"]
    return embed_fn(state.model_state, frames)

  batches = with_progress(batches, batches.num_batches, f"embedding {len(tracklets)} tracklets")
  return np.asarray(evaluation.extract_features(global_embed, batches, len(tracklets)),
                    np.float32)


def write_index(path: str, names: Sequence[str], tracklets: Sequence[Any]) -> str:
  """CSV `tracklet, pid, camera, num_frames, first_frame`, one row per embedding row."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(INDEX_COLUMNS)
    for name, t in zip(names, tracklets):
      writer.writerow([name, t.pid, t.camid, t.num_frames, t.frames[0]])
  return path


@app.register_mode("extract")
def extract_mode(
    config: ml_collections.ConfigDict, workdir: str, split: str | None = None,
    input_dir: str | None = None,
) -> dict:
  """Embeddings of `split` (query | gallery | train of the test split; default query) or of
  the tracklet folders of `input_dir` -> `W/features/<name>.npy` (T, D) float32 plus
  `W/features/<name>.csv` (tracklet, pid, camera, num_frames, first_frame), same row order.
  """
  from stmn_jax import train  # pylint: disable=g-import-not-at-top

  if split and input_dir:
    raise ValueError("--split and --input_dir exclude each other")
  split = split or "query"
  if not input_dir and split not in ("query", "gallery", "train"):
    raise ValueError(f"--split={split!r}: expected query, gallery or train")
  mesh = sharding.make_mesh()
  sharding.check_batch_config(config, mesh)
  if input_dir:
    names, tracklets = read_folder(input_dir)
    label = os.path.basename(os.path.normpath(input_dir))
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.source = "files"
    num_classes = None
  else:
    train_split, _, test_split, _ = train.load_data(config)
    num_classes = len({t.pid for t in train_split.train})
    tracklets = list(test_split.part(split))
    names = [f"{split}/{i}" for i in range(len(tracklets))]
    label = split
  state, ckpt_label, _ = restore_model(config, workdir, mesh, num_classes=num_classes)
  feats = embed_tracklets(state, tracklets, config, mesh)
  out_dir = os.path.join(os.path.abspath(workdir), "features")
  npy = os.path.join(out_dir, f"{label}.npy")
  index = os.path.join(out_dir, f"{label}.csv")
  if jax.process_index() == 0:  # every host holds the same pooled features
    os.makedirs(out_dir, exist_ok=True)
    np.save(npy, feats)
    write_index(index, names, tracklets)
  print(f"\nExtracted {feats.shape[0]} embeddings ({feats.shape[1]}-d, {ckpt_label}):\n"
        f"  {npy}\n  {index}", flush=True)
  return {"mode": "extract", "checkpoint": ckpt_label, "embeddings": npy, "index": index,
          "num_tracklets": int(feats.shape[0])}
