"""Jitted embedding functions of a model state: clips -> embeddings, and the whole-tracklet pieces.

TF-free (jax, flax, numpy): the data side (`inference.embed_tracklets`) feeds them batches.

A model supports `config.eval.sampling = "whole"` (one attention pass over every frame of a
tracklet, in bounded memory) when it offers the whole-tracklet protocol:
- `eval_chunk`: int, frames per chunk;
- `chunk_summary(frames (B, chunk, H, W, 3), mask (B, chunk)) -> summary`, a pytree of (B, ...)
  arrays of fixed size per chunk;
- `merge_chunk_summaries(first, then) -> summary` on host NumPy leaves of consecutive chunks;
- `embed_summary(summary (B, ...)) -> (B, D)`.
STA does; the engine never names a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from stmn_jax import errors
from stmn_jax import sharding

WHOLE_TRACKLET_METHODS = ("chunk_summary", "merge_chunk_summaries", "embed_summary")


def make_embed_fn(state: Any, mesh: Mesh, flip: bool) -> Callable:
  """Jitted `(model_state, frames (B, L, H, W, 3)) -> embedding (B, D)`, eval-mode model.

  With `flip`, the embedding is the mean of the clip's and its horizontal mirror's. The
  embedding is float32 whatever the model's compute dtype (`config.model.dtype`).
  """
  model_def = state.model_def_eval

  def embed(model_state, frames):
    model = nnx.merge(model_def, model_state)
    emb = model(frames)["embedding"].astype(jnp.float32)
    if flip:
      emb = 0.5 * (emb + model(jnp.flip(frames, axis=3))["embedding"].astype(jnp.float32))
    return emb

  return jax.jit(
      embed,
      in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
      out_shardings=sharding.data_sharded(mesh),
  )


# ------------------------------------------------------------------------------ whole tracklets
def supports_whole_tracklet(model: nnx.Module) -> bool:
  """True for models with the whole-tracklet protocol of the module docstring (STA)."""
  return all(callable(getattr(model, name, None))
             for name in WHOLE_TRACKLET_METHODS) and hasattr(model, "eval_chunk")


def check_whole_tracklet(config: ml_collections.ConfigDict, model: nnx.Module) -> None:
  """Raises a ValueError naming the model when it has no whole-tracklet embedding."""
  if not supports_whole_tracklet(model):
    raise errors.ConfigError(
        f"config.eval.sampling='whole' needs a model with a whole-tracklet embedding (STA); "
        f"config.model.name={config.model.name!r} ({type(model).__name__}) has none: use "
        f"'all_frames' or 'rrs'")


@dataclasses.dataclass(frozen=True)
class WholeTrackletFns:
  """Jitted pieces of `config.eval.sampling = "whole"` (see `make_whole_tracklet_fns`).

  `summarize(model_state, frames (B, chunk, H, W, 3), mask (B, chunk)) -> tuple of
  summaries (B, ...)` (one per view: the frames, then their mirror when flipping);
  `merge(first, then) -> summary` of consecutive chunks on the host (NumPy leaves);
  `embed(model_state, summary (rows, ...)) -> (rows, D)`. `chunk` frames per row, `rows` rows
  per global batch.
  """

  summarize: Callable
  merge: Callable
  embed: Callable
  chunk: int
  rows: int


def whole_tracklet_rows(config: ml_collections.ConfigDict, chunk: int, num_devices: int) -> int:
  """Chunks per global eval batch: as many frames as a clip batch (eval_batch_size x seq_len),
  rounded down to a multiple of the devices (at least one chunk per device)."""
  frames = int(config.data.eval_batch_size) * int(config.data.seq_len)
  return max(1, frames // chunk // num_devices) * num_devices


def make_whole_tracklet_fns(
    state: Any, config: ml_collections.ConfigDict, mesh: Mesh
) -> WholeTrackletFns:
  """Compiled-once functions of the whole-tracklet evaluation; checks the model supports it.

  The chunk size is the model's `eval_chunk` (STA: `config.model.sta.eval_chunk`).
  """
  model = state.model()
  check_whole_tracklet(config, model)
  chunk = int(model.eval_chunk)
  if chunk < 1:
    raise errors.ConfigError(f"config.model.{config.model.name}.eval_chunk = {chunk}: expected >= 1")
  model_def, flip = state.model_def_eval, bool(config.eval.flip)

  def summarize(model_state, frames, mask):
    m = nnx.merge(model_def, model_state)
    out = (m.chunk_summary(frames, mask),)
    if flip:
      out += (m.chunk_summary(jnp.flip(frames, axis=3), mask),)
    return out

  def embed(model_state, summary):
    return nnx.merge(model_def, model_state).embed_summary(summary)

  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return WholeTrackletFns(
      summarize=jax.jit(summarize, in_shardings=(rep, dat, dat), out_shardings=dat),
      merge=model.merge_chunk_summaries,
      embed=jax.jit(embed, in_shardings=(rep, rep), out_shardings=rep),
      chunk=chunk,
      rows=whole_tracklet_rows(config, chunk, mesh.size),
  )
