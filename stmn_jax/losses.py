"""Training losses for STMN, DRSA and STA; pure functions, computed in float32.

`total_loss(outputs, batch, config, rng)` reads the model's outputs dict by name (see
docs/ARCHITECTURE.md) and adds every term the outputs make possible, weighted by `config.loss`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from stmn_jax.models.batch_norm import chunk_sizes

_DIST_EPS = 1e-12  # inside the sqrt of the triplet distances (official code)


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean softmax cross-entropy. logits (B, C) or (B, L, C), labels (B,) int -> scalar.

  (B, L, C) logits are averaged over L *before* the softmax (the official STMN code's
  frame-level supervision). With label smoothing eps the target is (1 - eps) one-hot + eps / C.
  """
  logits = _f32(logits)
  if logits.ndim == 3:
    logits = jnp.mean(logits, axis=1)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"cross_entropy: expected logits (B, C) or (B, L, C) and labels (B,); got "
        f"{logits.shape} and {labels.shape}")
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def pairwise_distances(features: jax.Array) -> jax.Array:
  """(B, D) -> (B, B) Euclidean distances sqrt(sum (a - b)^2 + 1e-12)."""
  f = _f32(features)
  diff = f[:, None, :] - f[None, :, :]
  return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + _DIST_EPS)


def batch_hard_triplet(
    features: jax.Array, labels: jax.Array, margin: float | None = None
) -> jax.Array:
  """Batch-hard triplet loss. features (B, D), labels (B,) -> scalar.

  For each anchor i: z_i = max_{p != i, same id} d_ip - min_{n, other id} d_in.
  margin None or <= 0: soft margin log(1 + exp(z_i)) (official STMN code); else the hinge
  max(0, z_i + margin). Mean over anchors that have both a positive and a negative (anchors
  without one are left out; 0 if none has).
  """
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(
        f"batch_hard_triplet: expected features (B, D) and labels (B,); got "
        f"{features.shape} and {labels.shape}")
  d = pairwise_distances(features)
  b = d.shape[0]
  same = labels[:, None] == labels[None, :]
  pos_mask = same & ~jnp.eye(b, dtype=bool)
  neg_mask = ~same
  hardest_pos = jnp.max(jnp.where(pos_mask, d, -jnp.inf), axis=1)
  hardest_neg = jnp.min(jnp.where(neg_mask, d, jnp.inf), axis=1)
  valid = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
  z = jnp.where(valid, hardest_pos - hardest_neg, 0.0)
  if margin is None or margin <= 0:
    per_anchor = jax.nn.softplus(z)
  else:
    per_anchor = jax.nn.relu(z + margin)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(count, 1)


def memory_spread_loss(probs: jax.Array, margin: float, groups: int = 1) -> jax.Array:
  """Memory spread loss. probs (..., M) matching probabilities, all leading axes = queries.

  mean over slots m of relu(margin - (max_q probs[q, m] - min_q probs[q, m])): 0 when every
  slot is strongly addressed by some query and weakly by another; `margin` for uniform probs.
  The paper sums over the M slots; the official code takes the mean (used here), i.e. the
  paper's value is M times this one.

  `groups` > 1 (ghost BN's groups, `config.model.bn_groups`): the first axis (tracklets) is cut
  into `chunk_sizes(B, groups)` groups (torch.chunk, as `nn.DataParallel`), the loss is taken
  over the queries of each group, and the result is the unweighted mean of the group losses:
  the official code computes `mem_trip` per replica and adds `out[...]['mem_trip'].mean()` of
  the gathered per-replica values. The groups are static slices of the first axis.
  """
  p = _f32(probs)
  if groups > 1 and p.ndim >= 2:
    sizes = chunk_sizes(p.shape[0], groups)
    if len(sizes) > 1:
      starts = [sum(sizes[:k]) for k in range(len(sizes))]
      return jnp.mean(jnp.stack([
          memory_spread_loss(p[a:a + n], margin) for a, n in zip(starts, sizes)]))
  p = p.reshape(-1, p.shape[-1])
  spread = jnp.max(p, axis=0) - jnp.min(p, axis=0)
  return jnp.mean(jax.nn.relu(margin - spread))


def diversity_regularizer(attention: jax.Array, reduction: str = "paper") -> jax.Array:
  """DRSA's diversity regulariser. attention (..., K, P): K softmax maps over P locations.

  Q = sqrt(attention) per sample (K, P); R = ||Q Q^T - I||_F^2.
  reduction="paper": mean of R over all samples (leading axes).
  reduction="code": the released snippet's sqrt(sum_samples R + 1e-5), i.e. the Frobenius
  norm of the whole batch's stack (see docs models.md section 2).
  """
  a = _f32(attention)
  if a.ndim < 2:
    raise ValueError(f"diversity_regularizer: expected attention (..., K, P), got {a.shape}")
  k, p = a.shape[-2:]
  q = jnp.sqrt(jnp.maximum(a.reshape(-1, k, p), 1e-20))
  gram = jnp.einsum("nkp,njp->nkj", q, q) - jnp.eye(k, dtype=jnp.float32)
  per_sample = jnp.sum(jnp.square(gram), axis=(1, 2))
  if reduction == "paper":
    return jnp.mean(per_sample)
  if reduction == "code":
    return jnp.sqrt(jnp.sum(per_sample) + 1e-5)
  raise ValueError(f"diversity_regularizer: reduction must be 'paper' or 'code', got {reduction!r}")


def _safe_norm(x: jax.Array, axis) -> jax.Array:
  """sqrt(sum x^2) with a zero (not NaN) gradient at x == 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def interframe_frame_pairs(rng: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
  """Two distinct random frame indices per tracklet: (B,) i, (B,) j with i != j."""
  if length < 2:
    raise ValueError(f"interframe_regularizer needs at least 2 frames per tracklet, got L={length}")
  ki, kj = jax.random.split(rng)
  i = jax.random.randint(ki, (batch,), 0, length)
  j = (i + jax.random.randint(kj, (batch,), 1, length)) % length
  return i, j


def interframe_regularizer(maps: jax.Array, rng: jax.Array) -> jax.Array:
  """STA's inter-frame regulariser. maps (B, L, h, w) spatial attention maps -> scalar.

  For each tracklet two random distinct frames i != j (from `rng`); ||g_i - g_j||_F; mean over
  tracklets.
  """
  g = _f32(maps)
  if g.ndim != 4:
    raise ValueError(f"interframe_regularizer: expected maps (B, L, h, w), got {g.shape}")
  b, length = g.shape[:2]
  i, j = interframe_frame_pairs(rng, b, length)
  rows = jnp.arange(b)
  return jnp.mean(_safe_norm(g[rows, i] - g[rows, j], axis=(1, 2)))


def _get(config_loss: Any, name: str, default: float = 0.0) -> float:
  return config_loss.get(name, default) if hasattr(config_loss, "get") else getattr(
      config_loss, name, default)


def total_loss(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    config: Any,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of every loss term the outputs allow -> (loss, unweighted terms).

  Terms (each only when its output is present and its weight is > 0):
  ce_frame (mean_L frame_logits), ce_seq (seq_logits), triplet_frame (mean_L frame_feats),
  triplet_seq (seq_feats), spread_spatial (spatial_probs, all B*L*h*w rows), spread_temporal
  (temporal_probs, B rows) (both per ghost-BN group of tracklets and averaged when
  `config.model.bn_groups` > 1), diversity (part_attention (B, L, K, P), DRSA), interframe
  (spatial_scores (B, L, h, w), STA; needs `rng`). Labels: batch["pid"] (B,).
  """
  lc = config.loss
  labels = jnp.asarray(batch["pid"])
  ce_w = _get(lc, "ce_weight", 1.0)
  smoothing = _get(lc, "label_smoothing", 0.0)
  tri_w = _get(lc, "triplet_weight", 1.0)
  margin = _get(lc, "triplet_margin", 0.0)
  spread_w = _get(lc, "spread_weight", 0.0)
  spread_margin = _get(lc, "spread_margin", 0.3)
  spread_groups = int(_get(_get(config, "model", None) or {}, "bn_groups", 1))
  div_w = _get(lc, "diversity_weight", 0.0)
  inter_w = _get(lc, "interframe_weight", 0.0)

  terms: dict[str, jax.Array] = {}
  weights: dict[str, float] = {}

  def add(name: str, weight: float, fn):
    if weight > 0:
      terms[name] = fn()
      weights[name] = weight

  if "frame_logits" in outputs:
    add("ce_frame", ce_w, lambda: cross_entropy(outputs["frame_logits"], labels, smoothing))
  if "seq_logits" in outputs:
    add("ce_seq", ce_w, lambda: cross_entropy(outputs["seq_logits"], labels, smoothing))
  if "frame_feats" in outputs:
    add("triplet_frame", tri_w,
        lambda: batch_hard_triplet(jnp.mean(_f32(outputs["frame_feats"]), axis=1), labels, margin))
  if "seq_feats" in outputs:
    add("triplet_seq", tri_w, lambda: batch_hard_triplet(outputs["seq_feats"], labels, margin))
  if "spatial_probs" in outputs:
    add("spread_spatial", spread_w,
        lambda: memory_spread_loss(outputs["spatial_probs"], spread_margin, spread_groups))
  if "temporal_probs" in outputs:
    add("spread_temporal", spread_w,
        lambda: memory_spread_loss(outputs["temporal_probs"], spread_margin, spread_groups))
  if "part_attention" in outputs:
    reduction = _get(lc, "diversity_reduction", "paper")
    add("diversity", div_w, lambda: diversity_regularizer(outputs["part_attention"], reduction))
  if "spatial_scores" in outputs and inter_w > 0:
    if rng is None:
      raise ValueError(
          "total_loss: config.loss.interframe_weight > 0 and the outputs have 'spatial_scores', "
          "so an rng key is needed for the random frame pairs")
    add("interframe", inter_w, lambda: interframe_regularizer(outputs["spatial_scores"], rng))
  if not terms:
    raise ValueError(
        f"total_loss: no loss term applies to outputs {sorted(outputs)} with weights "
        f"{dict(lc) if hasattr(lc, 'items') else lc}")
  loss = sum(weights[k] * terms[k] for k in terms)
  return loss, terms
