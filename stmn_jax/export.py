"""`--mode=export`: a trained model as a TensorFlow SavedModel, plus its inference parameters.

Restores the best (or latest: `config.eval.checkpoint`) training checkpoint and writes
- `W/export/saved_model` (or `--export_dir`): a SavedModel through orbax-export whose
  `serving_default` signature maps uint8 frames `(batch, L, H, W, 3)` (batch free) to the
  retrieval embedding `(batch, D)` float32; normalisation (and the flip average when
  `config.eval.flip`) happens inside;
- `W/export/params`: an orbax checkpoint of the eval-mode model state alone (`{"model": ...}`,
  no optimizer), which the other modes restore when the workdir has no training checkpoint
  (`inference.restore_model`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from flax import nnx
from orbax.export import ExportManager, JaxModule, ServingConfig

from stmn_jax import inference

SIGNATURE = "serving_default"
INPUT_NAME = "frames"
OUTPUT_NAME = "embedding"


def default_saved_model_dir(workdir: str) -> str:
  return os.path.join(inference.export_dir(workdir), "saved_model")


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


def export_mode(
    config: ml_collections.ConfigDict, workdir: str,
    export_dir: str | None = None,  # pylint: disable=redefined-outer-name
) -> dict:
  """Restores the best / latest checkpoint; writes the SavedModel and `W/export/params`."""
  run = inference.prepare(config, workdir, read_data=False)
  state, label = run.state, run.checkpoint
  saved_model = export_saved_model(state, config, export_dir or default_saved_model_dir(workdir))
  params = inference.save_params(inference.params_dir(workdir), state.model_state)
  d = config.data
  print(f"\nExported {label}:\n  SavedModel {saved_model} (uint8 frames "
        f"(batch, {d.seq_len}, {d.height}, {d.width}, 3) -> embedding)\n  parameters {params}",
        flush=True)
  logging.info("exported %s to %s and %s", label, saved_model, params)
  return {"mode": "export", "checkpoint": label, "saved_model": saved_model, "params": params}
