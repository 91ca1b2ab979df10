"""DRSA: diversity-regularised spatiotemporal attention (Li, Bak, Carr, Wang, CVPR 2018).

A ResNet turns each of the L frames into a feature map X (h, w, C) (standard last stride 2: 8x4
at 256x128). K spatial attention models each score every location and take a softmax over the
h*w locations, giving K attention maps per frame. Each map pools X into one part vector, which a
per-part linear layer reduces to `part_dim` channels and L2-normalises. A per-part temporal
attention scores each frame's part vector and takes a softmax over the L frames; the weighted
sums are concatenated into the sequence embedding (K * part_dim). The diversity regulariser on the
spatial maps (Hellinger-based, `stmn_jax.losses.diversity_regularizer`) is added by `total_loss`
because the outputs carry `part_attention` (weight `config.loss.diversity_weight`, unverified;
`config.loss.diversity_reduction`: "paper" mean over frames, or the snippet's "code" form).

There is no full official code (two open-reid snippets only). Choices, all in `config.model.drsa`:
- `shared_hidden=False` (paper): each part k has its own hidden layer, e = w'_k^T ReLU(W_k x + b_k)
  + b'_k. True (snippet): one hidden layer shared by the K parts.
- `attention_bn=False` (paper: biases, no BatchNorm). True (snippet): BatchNorm after both 1x1
  convolutions and no biases.
- `hidden=64` (snippet's width; the paper's value is unverified), `num_parts=6` (paper, unverified
  here; the snippet's default is 3), `part_dim=128` (snippet).
- `normalize_parts=True`: L2-normalise each reduced part vector (snippet).
- The paper trains with OIM (a softmax over scaled cosine similarities to a lookup table of
  identity features). This project trains with CE + batch-hard triplet; the default classifier
  `classifier="cosine"` keeps OIM's logit form (`logit_scale` * cosine to a learned, normalised
  weight per identity, scale 30 as open-reid's OIM). `classifier="linear"`: a plain linear layer.
- The paper's temporal attention details are unverified: here a per-part linear score
  w_{t,k}^T x_{n,k} + b_{t,k} on the reduced part vectors, softmax over frames.
- Init: the snippet draws linear weights from N(0, 0.001). The part reduction (followed by an L2
  norm) and the cosine classifier are scale invariant, and Adam moves every weight by about the
  learning rate per step, so such tiny weights would change direction completely at every step;
  they use fan-in scaled normals instead. The temporal scores and the linear classifier keep
  N(0, 0.001). The attention convs use the snippet's kaiming fan-out with BatchNorm; without it
  (paper) He fan-in and N(0, 0.01) for the last layer, so the maps start near uniform.
- The triplet loss takes `seq_feats`, the same vector as the embedding.
- At 64x32 (smoke) the last-stride-2 map is 2x1: K=6 maps over 2 locations cannot be diverse, so
  the diversity term stays near its maximum K(K-1) there; it is meant for 8x4 maps or larger.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from stmn_jax.models import batch_norm, resnet

_BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
_BN_EPS = 1e-5
_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_kaiming_fan_in = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
_small_normal = nnx.initializers.normal(0.001)


def spatial_softmax(logits: jax.Array) -> jax.Array:
  """Attention logits (N, h, w, K) -> maps (N, K, h*w), softmax over the h*w locations."""
  n, h, w, k = logits.shape
  flat = jnp.transpose(logits.reshape(n, h * w, k), (0, 2, 1))
  return jax.nn.softmax(flat.astype(jnp.float32), axis=-1)


def attend_parts(features: jax.Array, attention: jax.Array) -> jax.Array:
  """Features (N, h, w, C), maps (N, K, h*w) -> part vectors (N, K, C) = sum_l S[k, l] X[l]."""
  n, h, w, c = features.shape
  flat = features.reshape(n, h * w, c).astype(jnp.float32)
  return jnp.einsum("nkl,nlc->nkc", attention, flat)


def temporal_pool(parts: jax.Array, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Parts (B, L, K, D), scores (B, L, K) -> (weights (B, L, K) softmax over L, fused (B, K, D))."""
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=1)
  return weights, jnp.einsum("blk,blkd->bkd", weights, parts)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _check_frames(frames: jax.Array, name: str) -> None:
  if frames.ndim != 5 or frames.shape[-1] != 3:
    raise ValueError(f"{name}: expected frames (B, L, H, W, 3), got shape {tuple(frames.shape)}")


class SpatialAttention(nnx.Module):
  """K spatial attention models: feature map (N, h, w, C) -> logits (N, h, w, K).

  shared_hidden=False: a 1x1 conv to K*hidden channels, then a grouped 1x1 conv (K groups), so
  each part reads only its own hidden units (the paper's per-part W_k, w'_k).
  """

  def __init__(
      self,
      in_features: int,
      num_parts: int,
      hidden: int,
      *,
      shared_hidden: bool = False,
      use_bn: bool = False,
      dtype: Any = jnp.float32,
      bn_running_var: str = "biased",
      bn_running_stats: str = "mean_of_groups",
      rngs: nnx.Rngs,
  ):
    width = hidden if shared_hidden else hidden * num_parts
    groups = 1 if shared_hidden else num_parts
    # With BatchNorm: the snippet's init (kaiming fan-out). Without it the logits would start with
    # a standard deviation of ~10 (one-hot maps); He fan-in plus a small last layer starts the
    # maps near uniform yet different per part (exactly equal maps are a stationary point of
    # the diversity regulariser).
    init1 = _kaiming_fan_out if use_bn else _kaiming_fan_in
    init2 = _kaiming_fan_out if use_bn else nnx.initializers.normal(0.01)
    self.conv1 = nnx.Conv(
        in_features, width, (1, 1), use_bias=not use_bn, kernel_init=init1, dtype=dtype,
        rngs=rngs)
    self.conv2 = nnx.Conv(
        width, num_parts, (1, 1), feature_group_count=groups, use_bias=not use_bn,
        kernel_init=init2, dtype=dtype, rngs=rngs)
    bn = lambda n: batch_norm.head_batch_norm(
        n, running_var=bn_running_var, running_stats=bn_running_stats, momentum=_BN_MOMENTUM,
        epsilon=_BN_EPS, dtype=dtype, rngs=rngs)
    self.bn1 = bn(width) if use_bn else None
    self.bn2 = bn(num_parts) if use_bn else None

  def __call__(self, x: jax.Array, groups: batch_norm.Groups | None = None) -> jax.Array:
    """(N, h, w, C) -> (N, h, w, K) unnormalised scores; `groups`: ghost-BN tracklet groups."""
    y = self.conv1(x)
    if self.bn1 is not None:
      y = self.bn1(y, groups=groups)
    y = self.conv2(jax.nn.relu(y))
    if self.bn2 is not None:
      y = self.bn2(y, groups=groups)
    return y


class PartReduction(nnx.Module):
  """Per-part linear layer: (..., K, C) -> (..., K, D), weight (K, C, D), bias (K, D)."""

  def __init__(self, num_parts: int, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.kernel = nnx.Param(init(rngs.params(), (num_parts, in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((num_parts, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...kc,kcd->...kd", x, self.kernel[...]) + self.bias[...]


class TemporalAttention(nnx.Module):
  """Per-part frame scores: parts (B, L, K, D) -> scores (B, L, K) = w_k . x_{l,k} + b_k."""

  def __init__(self, num_parts: int, features: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_small_normal(rngs.params(), (num_parts, features)))
    self.bias = nnx.Param(jnp.zeros((num_parts,)))

  def __call__(self, parts: jax.Array) -> jax.Array:
    return jnp.einsum("blkd,kd->blk", parts, self.kernel[...]) + self.bias[...]


class CosineClassifier(nnx.Module):
  """logits = scale * cos(x, w_c): (B, D) -> (B, C); OIM-like logits with learned prototypes."""

  def __init__(self, in_features: int, num_classes: int, scale: float, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(in_features ** -0.5)  # columns of norm ~1
    self.kernel = nnx.Param(init(rngs.params(), (in_features, num_classes)))
    self.scale = scale

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.scale * (l2_normalize(x) @ l2_normalize(self.kernel[...], axis=0))


class DRSA(nnx.Module):
  """DRSA model. `__call__`: frames (B, L, H, W, 3) -> outputs dict (see docs/ARCHITECTURE.md).

  Outputs: `embedding`, `seq_feats` (B, K*part_dim) (the same vector: concatenated, temporally
  fused part features), `seq_logits` (B, C), `part_attention` (B, L, K, h*w) (sums to 1 over
  locations), `temporal_attention` (B, L, K) (sums to 1 over L), `frame_weights` (B, L) (its
  mean over parts).
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int, *, rngs: nnx.Rngs):
    m = config.model
    d = m.drsa
    dtype = resnet.compute_dtype(m.dtype)
    if d.classifier not in ("cosine", "linear"):
      raise ValueError(
          f"config.model.drsa.classifier: expected 'cosine' or 'linear', got {d.classifier!r}")
    if d.num_parts < 1 or d.part_dim < 1 or d.hidden < 1:
      raise ValueError(
          "config.model.drsa: num_parts, part_dim and hidden must be >= 1, got "
          f"{d.num_parts}, {d.part_dim}, {d.hidden}")
    self.num_parts = d.num_parts
    self.part_dim = d.part_dim
    self.normalize_parts = bool(d.normalize_parts)
    self.dtype = dtype
    self.bn_groups = batch_norm.bn_groups(m)
    channels = resnet.stage_channels(m.depth, m.width)[3]
    self.trunk, self.stage = resnet.backbone_from_config(m, rngs=rngs)
    self.spatial = SpatialAttention(
        channels, d.num_parts, d.hidden, shared_hidden=d.shared_hidden, use_bn=d.attention_bn,
        dtype=dtype, bn_running_var=batch_norm.bn_running_var(m),
        bn_running_stats=batch_norm.bn_running_stats(m), rngs=rngs)
    self.reduce = PartReduction(d.num_parts, channels, d.part_dim, rngs=rngs)
    self.temporal = TemporalAttention(d.num_parts, d.part_dim, rngs=rngs)
    embed_dim = d.num_parts * d.part_dim
    if d.classifier == "cosine":
      self.classifier = CosineClassifier(embed_dim, num_classes, d.logit_scale, rngs=rngs)
    else:
      self.classifier = nnx.Linear(
          embed_dim, num_classes, use_bias=False, kernel_init=_small_normal, rngs=rngs)

  def frame_parts(
      self, frames: jax.Array, groups: batch_norm.Groups | None = None
  ) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
    """Frames (N, H, W, 3) -> (parts (N, K, part_dim), maps (N, K, h*w), (h, w)); `groups`:
    ghost-BN tracklet groups of the N frames (`config.model.bn_groups`; None: whole batch)."""
    x = self.stage(self.trunk(frames.astype(self.dtype), groups), groups)
    maps = spatial_softmax(self.spatial(x, groups))
    parts = self.reduce(attend_parts(x, maps))
    if self.normalize_parts:
      parts = l2_normalize(parts)
    return parts, maps, x.shape[1:3]

  def __call__(self, frames: jax.Array) -> dict[str, jax.Array]:
    _check_frames(frames, "DRSA input")
    b, l = frames.shape[:2]
    parts, maps, _ = self.frame_parts(frames.reshape((b * l,) + frames.shape[2:]),
                                      batch_norm.tracklet_groups(
                                          b, self.bn_groups, batch_norm.in_training(self)))
    parts = parts.reshape(b, l, self.num_parts, self.part_dim)
    weights, fused = temporal_pool(parts, self.temporal(parts))
    embedding = fused.reshape(b, self.num_parts * self.part_dim)
    return {
        "embedding": embedding,
        "seq_feats": embedding,
        "seq_logits": self.classifier(embedding),
        "part_attention": maps.reshape(b, l, self.num_parts, -1),
        "temporal_attention": weights,
        "frame_weights": jnp.mean(weights, axis=-1),
    }
