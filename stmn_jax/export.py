"""`--mode=export`: a trained model as a TensorFlow SavedModel or an ONNX file, plus its inference
parameters.

Restores the best (or latest: `config.eval.checkpoint`) training checkpoint and writes
- with `--export_format=savedmodel` (the default): `W/export/saved_model` (or `--export_dir`), a
  SavedModel through orbax-export whose `serving_default` signature maps uint8 frames
  `(batch, L, H, W, 3)` (batch free) to the retrieval embedding `(batch, D)` float32;
  normalisation (and the flip average when `config.eval.flip`) happens inside;
- with `--export_format=onnx`: `W/export/model.onnx` (or `--export_dir`/model.onnx), the same
  function and signature (`frames` -> `embedding`, batch free) as an ONNX graph
  (`onnx_export.py`: our own jaxpr -> ONNX converter, opset 18; the README says why);
- `W/export/params`: an orbax checkpoint of the eval-mode model state alone (`{"model": ...}`,
  no optimizer), which the other modes restore when the workdir has no training checkpoint
  (`inference.restore_model`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath
from flax import nnx
from orbax.export import ExportManager, JaxModule, ServingConfig

from stmn_jax import errors
from stmn_jax import inference
from stmn_jax import onnx_export

SIGNATURE = "serving_default"
INPUT_NAME = "frames"
OUTPUT_NAME = "embedding"
EXPORT_FORMATS = ("savedmodel", "onnx")
ONNX_FILE = "model.onnx"


def default_saved_model_dir(workdir: str) -> str:
  return str(epath.Path(inference.export_dir(workdir)) / "saved_model")


def check_export_format(export_format: str | None) -> str:
  """`--export_format` -> "savedmodel" (also for "" / None) or "onnx"; anything else is a
  ConfigError."""
  value = (export_format or "savedmodel").lower()
  if value not in EXPORT_FORMATS:
    raise errors.ConfigError(
        f"--export_format={export_format!r}: expected one of {', '.join(EXPORT_FORMATS)} "
        "(empty = savedmodel)")
  return value


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
  path = str(epath.Path(path))
  if jax.process_index() == 0:
    ExportManager(module, [serving]).save(path)
  return path


def export_onnx(state, config: ml_collections.ConfigDict, path: str) -> str:
  """Writes the eval-mode model of `state` as an ONNX file at `path`: `frames` uint8
  `(batch, L, H, W, 3)` -> `embedding` float32 `(batch, D)`, batch free (an ONNX Scan over the
  clips of a one-clip graph), the function `make_inference_fn` serves. Only process 0 writes.
  """
  d = config.data
  params, treedef = flat_params(state.model_state)
  fn = make_inference_fn(state.model_def_eval, treedef, config)
  path = epath.Path(path)
  if jax.process_index() == 0:
    onnx_export.export_onnx(lambda frames: fn(params, frames),
                            (int(d.seq_len), int(d.height), int(d.width), 3), path)
  return str(path)


def export_mode(
    config: ml_collections.ConfigDict, workdir: str,
    export_dir: str | None = None,  # pylint: disable=redefined-outer-name
    export_format: str | None = None,
) -> dict:
  """Restores the best / latest checkpoint; writes the SavedModel (or with
  `export_format="onnx"` the ONNX file `model.onnx` in `export_dir`, default `W/export`) and
  `W/export/params`."""
  export_format = check_export_format(export_format)
  run = inference.prepare(config, workdir, read_data=False)
  state, label = run.state, run.checkpoint
  if export_format == "onnx":
    folder = epath.Path(export_dir or inference.export_dir(workdir))
    key, kind = "onnx", "ONNX"
    written = export_onnx(state, config, str(folder / ONNX_FILE))
  else:
    key, kind = "saved_model", "SavedModel"
    written = export_saved_model(state, config, export_dir or default_saved_model_dir(workdir))
  params = inference.save_params(inference.params_dir(workdir), state.model_state)
  d = config.data
  print(f"\nExported {label}:\n  {kind} {written} (uint8 frames "
        f"(batch, {d.seq_len}, {d.height}, {d.width}, 3) -> embedding)\n  parameters {params}",
        flush=True)
  logging.info("exported %s to %s and %s", label, written, params)
  return {"mode": "export", "checkpoint": label, "format": export_format, key: written,
          "params": params}
