"""STMN (Eom et al., ICCV 2021) in Flax NNX, with the baseline and the memory ablations.

Layout (official code, ResNet-50 at 256x128 -> 16x8 maps with last stride 1):
- a shared trunk (stem + layer1..layer3);
- three copies of layer4: the value branch (final ReLU), the spatial-query branch and the
  temporal-query branch (both without the last block's final ReLU); a query copy exists only
  when its memory is on;
- spatial memory: refines every frame's value map, f_s = f_o - BN(read-out), then GAP;
- temporal memory: LSTM over the GAP-ed temporal queries addresses the memory; its output,
  a softmax over the L frames, weights the (pre-BN) refined frame features;
- BNNeck heads for the frame and the sequence features: BatchNorm whose scale is trainable and
  whose bias stays at 0 (a `FrozenBias` variable, not an `nnx.Param`, so
  `nnx.Optimizer(model, tx, wrt=nnx.Param)` and `nnx.grad` never touch it, and no weight
  decay applies to it); then linear classifiers without bias, weights ~ N(0, 0.001).

Baseline (`spatial_memory=False, temporal_memory=False`): value branch only, GAP and temporal
average pooling. Each memory can be switched off on its own (spatial off: frame features are
GAP of the value map; temporal off: temporal average pooling, frame weights 1/L).
Paper vs code switches live in `config.model`: `stem_relu` (code: False), `smem_layout`
(code HEAD: "nchw_flat"), `memory_similarity` (code: "code"); see `memory.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from stmn_jax.models import batch_norm, memory, resnet

CLASSIFIER_STD = 0.001


class FrozenBias(nnx.Variable):
  """A variable that is part of the model state but never trained (not an `nnx.Param`)."""


class BNNeck(nnx.Module):
  """BatchNorm1d with trainable scale (init 1) and a bias frozen at 0: (N, D) -> (N, D).

  `bn_running_var`, `bn_running_stats`, `groups` (ghost BN): see `models/batch_norm.py`.
  """

  def __init__(self, dim: int, *, dtype: Any = jnp.float32, bn_running_var: str = "biased",
               bn_running_stats: str = "mean_of_groups", rngs: nnx.Rngs):
    self.bn = batch_norm.head_batch_norm(
        dim, running_var=bn_running_var, running_stats=bn_running_stats, use_bias=False,
        momentum=memory.BN_MOMENTUM, epsilon=memory.BN_EPSILON, dtype=dtype, rngs=rngs)
    self.bias = FrozenBias(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x: jax.Array, groups: batch_norm.Groups | None = None) -> jax.Array:
    y = self.bn(x, groups=groups)
    return y + self.bias[...].astype(y.dtype)


def _gap(x: jax.Array) -> jax.Array:
  """(N, h, w, D) -> (N, D), mean over space."""
  return jnp.mean(x, axis=(1, 2))


class STMN(nnx.Module):
  """STMN / baseline / ablations: frames (B, L, H, W, 3) -> outputs dict.

  Reads from `config_model` (configs/default.py `config.model`): depth, width, last_stride,
  stem_relu, spatial_memory, temporal_memory, spatial_slots (M), temporal_slots (N),
  smem_layout, memory_similarity, dtype, bn_running_var, bn_running_stats, bn_groups,
  lstm_biases. `seq_len` is L (`config.data.seq_len`), the length of the temporal memory's
  values; with the temporal memory on, inputs must have exactly L frames.

  Ghost BN (`bn_groups` = G > 1): in training mode the B tracklets of a call are cut into
  `batch_norm.chunk_sizes(B, G)` groups (torch.chunk, as `nn.DataParallel` on G GPUs), and
  every BatchNorm (backbone, memory read-out, both BNNecks) normalises each group with its own
  statistics. The memory spread losses follow the same groups (`losses.total_loss`).
  """

  def __init__(
      self,
      config_model: ml_collections.ConfigDict,
      num_classes: int,
      *,
      seq_len: int,
      rngs: nnx.Rngs,
  ):
    m = config_model
    if num_classes < 1:
      raise ValueError(f"STMN: num_classes must be positive, got {num_classes}")
    self.dtype = dtype = resnet.compute_dtype(m.dtype)
    self.use_spatial = bool(m.spatial_memory)
    self.use_temporal = bool(m.temporal_memory)
    self.seq_len = int(seq_len)
    self.num_classes = num_classes
    self.bn_groups = batch_norm.bn_groups(m)
    bn_kw = dict(bn_running_var=batch_norm.bn_running_var(m),
                 bn_running_stats=batch_norm.bn_running_stats(m))
    self.dim = dim = resnet.stage_channels(m.depth, m.width)[3]
    self.trunk, self.value_stage = resnet.backbone_from_config(m, rngs=rngs)
    if self.use_spatial:
      self.spatial_query_stage = resnet.stage_from_config(m, final_relu=False, rngs=rngs)
      self.spatial_memory = memory.SpatialMemory(
          dim, m.spatial_slots, layout=m.smem_layout, similarity=m.memory_similarity,
          dtype=dtype, **bn_kw, rngs=rngs)
    if self.use_temporal:
      self.temporal_query_stage = resnet.stage_from_config(m, final_relu=False, rngs=rngs)
      self.temporal_memory = memory.TemporalMemory(
          dim, m.temporal_slots, self.seq_len, similarity=m.memory_similarity, dtype=dtype,
          lstm_biases=m.get("lstm_biases", 1), rngs=rngs)
    self.frame_neck = BNNeck(dim, dtype=dtype, **bn_kw, rngs=rngs)
    self.seq_neck = BNNeck(dim, dtype=dtype, **bn_kw, rngs=rngs)
    init = nnx.initializers.normal(CLASSIFIER_STD)
    self.frame_classifier = nnx.Linear(
        dim, num_classes, use_bias=False, kernel_init=init, dtype=dtype, rngs=rngs)
    self.seq_classifier = nnx.Linear(
        dim, num_classes, use_bias=False, kernel_init=init, dtype=dtype, rngs=rngs)

  def __call__(self, frames: jax.Array, *, return_maps: bool = False) -> dict[str, jax.Array]:
    """frames (B, L, H, W, 3) -> dict (docs/ARCHITECTURE.md):

    embedding (B, D) BN(seq feature); frame_logits (B, L, C); seq_logits (B, C);
    frame_feats (B, L, D), seq_feats (B, D) pre-BN; frame_weights (B, L);
    spatial_probs (B, L, h*w, M) if the spatial memory is on; temporal_probs (B, N) if the
    temporal memory is on. `return_maps=True` also returns value_maps and refined_maps
    (B, L, h, w, D): the per-location features before / after the spatial memory (equal when
    it is off), e.g. for ||f_s|| - ||f_o|| figures.
    """
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"STMN expects frames (B, L, H, W, 3), got shape {frames.shape}")
    b, length = frames.shape[:2]
    if self.use_temporal and length != self.seq_len:
      raise ValueError(
          f"STMN: the temporal memory holds attentions over L={self.seq_len} frames "
          f"(config.data.seq_len); got clips of {length} frames")
    x = frames.reshape(b * length, *frames.shape[2:]).astype(self.dtype)
    # None: whole-batch statistics (one group, or eval mode).
    groups = batch_norm.tracklet_groups(b, self.bn_groups, batch_norm.in_training(self))
    shared = self.trunk(x, groups)
    value = self.value_stage(shared, groups)  # (BL, h, w, D), >= 0
    _, h, w, d = value.shape
    out: dict[str, jax.Array] = {}
    if self.use_spatial:
      refined, sprobs = self.spatial_memory(
          self.spatial_query_stage(shared, groups), value, groups)
      out["spatial_probs"] = sprobs.reshape(b, length, h * w, -1)
    else:
      refined = value
    frame = _gap(refined)  # (BL, D)
    frame_feats = frame.reshape(b, length, d)
    if self.use_temporal:
      tq = _gap(self.temporal_query_stage(shared, groups)).reshape(b, length, d)
      seq, tprobs, weights = self.temporal_memory(tq, frame_feats)
      out["temporal_probs"] = tprobs
    else:
      weights = jnp.full((b, length), 1.0 / length, jnp.float32)
      seq = jnp.mean(frame_feats, axis=1)
    embedding = self.seq_neck(seq, groups)
    out.update(
        embedding=embedding,
        frame_logits=self.frame_classifier(self.frame_neck(frame, groups)).reshape(b, length, -1),
        seq_logits=self.seq_classifier(embedding),
        frame_feats=frame_feats,
        seq_feats=seq,
        frame_weights=weights,
    )
    if return_maps:
      out["value_maps"] = value.reshape(b, length, h, w, d)
      out["refined_maps"] = refined.reshape(b, length, h, w, d)
    return out


def feature_norm_change(outputs: dict[str, jax.Array]) -> jax.Array:
  """||f_s|| - ||f_o|| per location from `return_maps=True` outputs -> (B, L, h, w) float32."""
  norm = lambda x: jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
  return norm(outputs["refined_maps"]) - norm(outputs["value_maps"])


def build(config: ml_collections.ConfigDict, num_classes: int, *, rngs: nnx.Rngs) -> STMN:
  """Registry builder: STMN from the full config (model settings + data.seq_len)."""
  return STMN(config.model, num_classes, seq_len=config.data.seq_len, rngs=rngs)
