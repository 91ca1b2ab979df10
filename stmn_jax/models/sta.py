"""STA: spatial-temporal attention (Fu, Wang, Wei, Huang, AAAI 2019).

A ResNet with last stride 1 maps each of the L frames to f (h, w, C) (16x8 at 256x128). The
attention has no parameters: a per-frame map g (h, w) rates every location by its activation
energy; the h rows are cut into K horizontal stripes and each stripe's score s_{n,k} is the g mass
inside it. Normalising s over the frames gives the 2-D score matrix S (each stripe's column sums to
1 over frames). Per stripe, f1_k is the stripe of the best-scoring frame and f2_k the S-weighted sum
of the stripe over frames; the two are concatenated along channels and averaged over stripes and
locations, then Linear(no bias) + BatchNorm + ReLU reduces them to `embed_dim` (1024): the
embedding (also the triplet input), followed by a linear classifier. Training adds the
inter-frame regulariser on g (`stmn_jax.losses.interframe_regularizer`, weight
`config.loss.interframe_weight`) because the outputs carry `spatial_scores`.

Fusing the pooled stripe vectors v_{n,k} (mean of f over stripe k) equals fusing the region maps
and pooling afterwards, as the paper does: selection, weighted sums and averaging commute.

No official code exists. Choices, all in `config.model.sta` / `config.loss`:
- `attention="paper"`: g = sum_d f^2 per location, l1-normalised over the h*w locations; stripe
  score = sum of g over the stripe. "torchreid" (a third-party reimplementation): g = ||f||_2 per
  location, L2-normalised over locations; stripe score = mean of g over the stripe.
- `num_stripes=4`, `embed_dim=1024`; `interframe_weight=3e-4` and triplet margin 0.3 are
  unverified guesses (the spec could not confirm the paper's values).
- If h is not a multiple of K, the top h mod K stripes get one extra row (`np.array_split`).

Test time: the attention normalises over any number of frames, so `embed_all_frames` runs the
backbone over a whole tracklet in chunks of `eval_chunk` frames (bounded memory) and fuses all T
frames in one pass. Averaging the embeddings of L-frame clips goes through the normal `__call__`.
The engine's `config.eval.sampling = "whole"` does the same jitted and masked: `chunk_summary`
reduces each fixed-size chunk (padding masked out) to a `StripeSummary` whose size does not grow
with the tracklet, `merge_chunk_summaries` (`merge_summaries` on host NumPy) joins a tracklet's
chunks, `embed_summary` fuses and embeds (the whole-tracklet protocol: see
`STA.merge_chunk_summaries`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from stmn_jax.models import batch_norm, resnet

_BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
_BN_EPS = 1e-5
_EPS = 1e-12
ATTENTION_VARIANTS = ("paper", "torchreid")


def stripe_matrix(height: int, num_stripes: int) -> np.ndarray:
  """(h, K) one-hot float32 row -> stripe, contiguous, top first (as `np.array_split`)."""
  if height < num_stripes:
    raise ValueError(
        f"config.model.sta.num_stripes={num_stripes} exceeds the feature map height {height}")
  sizes = [len(rows) for rows in np.array_split(np.arange(height), num_stripes)]
  stripe_of_row = np.repeat(np.arange(num_stripes), sizes)
  return np.eye(num_stripes, dtype=np.float32)[stripe_of_row]


def spatial_scores(features: jax.Array, variant: str = "paper") -> jax.Array:
  """Feature maps (N, h, w, C) -> normalised attention maps g (N, h, w)."""
  f = features.astype(jnp.float32)
  if variant == "paper":
    q = jnp.sum(jnp.square(f), axis=-1)
    return q / jnp.maximum(jnp.sum(q, axis=(1, 2), keepdims=True), _EPS)
  if variant == "torchreid":
    q = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1) + _EPS)
    return q / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(q), axis=(1, 2), keepdims=True)), _EPS)
  raise ValueError(f"config.model.sta.attention: expected one of {ATTENTION_VARIANTS}, got {variant!r}")


def stripe_scores(g: jax.Array, num_stripes: int, variant: str = "paper") -> jax.Array:
  """Maps g (N, h, w) -> stripe scores s (N, K): g summed (paper) or averaged over each stripe."""
  m = stripe_matrix(g.shape[1], num_stripes)
  s = jnp.sum(g, axis=2) @ m
  if variant == "torchreid":
    s = s / (m.sum(axis=0) * g.shape[2])
  return s


def stripe_vectors(features: jax.Array, num_stripes: int) -> jax.Array:
  """Feature maps (N, h, w, C) -> stripe vectors v (N, K, C): mean of f over each stripe."""
  m = stripe_matrix(features.shape[1], num_stripes)
  rows = jnp.mean(features.astype(jnp.float32), axis=2)  # (N, h, C)
  return jnp.einsum("nhc,hk->nkc", rows, m / m.sum(axis=0))


def frame_attention(s: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Stripe scores (B, L, K) -> S (B, L, K), normalised over frames (columns sum to 1).

  `mask` (B, L) bool, False on padding frames: those get S = 0 and do not enter the sum.
  """
  if mask is not None:
    s = jnp.where(mask[..., None], s, 0.0)
  return s / jnp.maximum(jnp.sum(s, axis=1, keepdims=True), _EPS)


def fuse(v: jax.Array, attention: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Stripe vectors (B, L, K, C), S (B, L, K) -> (B, 2C).

  f1_k = v of the frame with the highest S for stripe k, f2_k = sum_n S(n, k) v_{n,k};
  [f1, f2] concatenated along channels and averaged over the K stripes. `mask` (B, L) keeps
  padding frames out of the arg-max (their S must already be 0, see `frame_attention`).
  """
  ranked = attention if mask is None else jnp.where(mask[..., None], attention, -jnp.inf)
  best = jnp.argmax(ranked, axis=1)  # (B, K)
  f1 = jnp.take_along_axis(v, best[:, None, :, None], axis=1)[:, 0]
  f2 = jnp.einsum("blk,blkc->bkc", attention, v)
  return jnp.mean(jnp.concatenate([f1, f2], axis=-1), axis=1)


class StripeSummary(NamedTuple):
  """What `fuse` needs from a run of frames, of a size that does not grow with the run.

  `weighted` (..., K, C) = sum_n s_{n,k} v_{n,k}; `total` (..., K) = sum_n s_{n,k};
  `best_score` (..., K) = max_n s_{n,k} (-inf for no frame); `best_vector` (..., K, C) = the v of
  the first frame reaching it. Normalising s over frames divides every score of a stripe by the
  same positive number, so the arg-max is the same and f2 = weighted / total.
  """

  weighted: Any
  total: Any
  best_score: Any
  best_vector: Any


def summarize(v: jax.Array, s: jax.Array, mask: jax.Array) -> StripeSummary:
  """Stripe vectors (B, L, K, C), scores (B, L, K), mask (B, L) -> StripeSummary with (B, ...)."""
  mask = mask.astype(bool)
  s_valid = jnp.where(mask[..., None], s, 0.0)
  ranked = jnp.where(mask[..., None], s, -jnp.inf)
  best = jnp.argmax(ranked, axis=1)  # (B, K); first frame on ties, like `fuse`
  return StripeSummary(
      weighted=jnp.einsum("blk,blkc->bkc", s_valid, v),
      total=jnp.sum(s_valid, axis=1),
      best_score=jnp.max(ranked, axis=1),
      best_vector=jnp.take_along_axis(v, best[:, None, :, None], axis=1)[:, 0],
  )


def merge_summaries(first: StripeSummary, then: StripeSummary, xp: Any = jnp) -> StripeSummary:
  """Summary of frames `first` followed by frames `then` (same leading shape; `xp`: jnp or np).

  A later frame replaces the best only with a strictly higher score (the first arg-max wins).
  """
  take = then.best_score > first.best_score  # (..., K)
  return StripeSummary(
      weighted=first.weighted + then.weighted,
      total=first.total + then.total,
      best_score=xp.where(take, then.best_score, first.best_score),
      best_vector=xp.where(take[..., None], then.best_vector, first.best_vector),
  )


def fuse_summary(summary: StripeSummary, xp: Any = jnp) -> Any:
  """StripeSummary (..., K, C) -> fused (..., 2C), equal to `fuse(v, frame_attention(s))`."""
  f2 = summary.weighted / xp.maximum(summary.total, _EPS)[..., None]
  return xp.mean(xp.concatenate([summary.best_vector, f2], axis=-1), axis=-2)


class STA(nnx.Module):
  """STA model. `__call__`: frames (B, L, H, W, 3) -> outputs dict (see docs/ARCHITECTURE.md).

  Outputs: `embedding`, `seq_feats` (B, embed_dim) (the same post-ReLU vector, as the paper's
  triplet input), `seq_logits` (B, C), `spatial_scores` (B, L, h, w) (g, for the inter-frame
  regulariser), `stripe_attention` (B, L, K) (S: sums to 1 over L), `frame_weights` (B, L) (S
  averaged over stripes).
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int, *, rngs: nnx.Rngs):
    m = config.model
    s = m.sta
    if s.attention not in ATTENTION_VARIANTS:
      raise ValueError(
          f"config.model.sta.attention: expected one of {ATTENTION_VARIANTS}, got {s.attention!r}")
    if s.num_stripes < 1 or s.embed_dim < 1:
      raise ValueError(
          "config.model.sta: num_stripes and embed_dim must be >= 1, got "
          f"{s.num_stripes}, {s.embed_dim}")
    dtype = resnet.compute_dtype(m.dtype)
    self.dtype = dtype
    self.num_stripes = s.num_stripes
    self.attention = s.attention
    self.eval_chunk = s.get("eval_chunk", 32)
    self.bn_groups = batch_norm.bn_groups(m)
    channels = resnet.stage_channels(m.depth, m.width)[3]
    self.trunk, self.stage = resnet.backbone_from_config(m, rngs=rngs)
    kaiming = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
    self.reduce = nnx.Linear(2 * channels, s.embed_dim, use_bias=False, kernel_init=kaiming,
                             rngs=rngs)
    self.bn = batch_norm.head_batch_norm(
        s.embed_dim, running_var=batch_norm.bn_running_var(m),
        running_stats=batch_norm.bn_running_stats(m), momentum=_BN_MOMENTUM, epsilon=_BN_EPS,
        dtype=None, rngs=rngs)
    self.classifier = nnx.Linear(s.embed_dim, num_classes, use_bias=False,
                                 kernel_init=nnx.initializers.normal(0.001), rngs=rngs)

  def frame_stripes(
      self, frames: jax.Array, groups: batch_norm.Groups | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Frames (N, H, W, 3) -> (v (N, K, C), s (N, K), g (N, h, w)); `groups`: ghost-BN
    tracklet groups of the N frames (`config.model.bn_groups`; None: the whole batch)."""
    f = self.stage(self.trunk(frames.astype(self.dtype), groups), groups)
    g = spatial_scores(f, self.attention)
    return (stripe_vectors(f, self.num_stripes), stripe_scores(g, self.num_stripes, self.attention),
            g)

  def head(self, fused: jax.Array, groups: batch_norm.Groups | None = None) -> jax.Array:
    """Fused (B, 2C) -> embedding (B, embed_dim) = ReLU(BN(W x)); `groups`: ghost BN."""
    return jax.nn.relu(self.bn(self.reduce(fused), groups=groups))

  def chunk_summary(self, frames: jax.Array, mask: jax.Array) -> StripeSummary:
    """Chunks of frames (B, L, H, W, 3), mask (B, L) -> StripeSummary (B, K, C) of each chunk.

    Jit-friendly (fixed shapes; padding frames are masked out). `merge_summaries` joins the
    chunks of a tracklet in time order, `embed_summary` turns the result into the embedding.
    """
    if frames.ndim != 5 or frames.shape[-1] != 3 or mask.shape != frames.shape[:2]:
      raise ValueError(
          "STA.chunk_summary: expected frames (B, L, H, W, 3) and mask (B, L), got "
          f"{tuple(frames.shape)} and {tuple(mask.shape)}")
    b, l = frames.shape[:2]
    v, s, _ = self.frame_stripes(frames.reshape((b * l,) + frames.shape[2:]))
    k = self.num_stripes
    return summarize(v.reshape(b, l, k, -1), s.reshape(b, l, k), mask)

  def merge_chunk_summaries(self, first: StripeSummary, then: StripeSummary) -> StripeSummary:
    """Host (NumPy) summaries of consecutive chunks (B, K, C), `first` earlier -> their summary.

    The whole-tracklet protocol (`config.eval.sampling="whole"`), by which the engine talks to a
    model without knowing it: the model has `eval_chunk` (int, frames per chunk),
    `chunk_summary(frames (B, L, H, W, 3), mask (B, L)) -> summary` (a pytree of (B, ...)
    arrays, here a `StripeSummary` NamedTuple, so the engine can stack, pad and slice it with
    `jax.tree.map`), this method on NumPy leaves (any tuple of the four leaves in field order),
    and `embed_summary(summary (B, ...)) -> (B, D)`.
    """
    return merge_summaries(StripeSummary(*first), StripeSummary(*then), xp=np)

  def embed_summary(self, summary: StripeSummary) -> jax.Array:
    """StripeSummary of whole tracklets (B, K, C) -> embeddings (B, embed_dim)."""
    return self.head(fuse_summary(summary))

  def __call__(self, frames: jax.Array) -> dict[str, jax.Array]:
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"STA input: expected frames (B, L, H, W, 3), got shape {tuple(frames.shape)}")
    b, l = frames.shape[:2]
    groups = batch_norm.tracklet_groups(
        b, self.bn_groups, batch_norm.in_training(self))  # None: whole-batch statistics
    v, s, g = self.frame_stripes(frames.reshape((b * l,) + frames.shape[2:]), groups)
    k = self.num_stripes
    attention = frame_attention(s.reshape(b, l, k))
    embedding = self.head(fuse(v.reshape(b, l, k, -1), attention), groups)
    return {
        "embedding": embedding,
        "seq_feats": embedding,
        "seq_logits": self.classifier(embedding),
        "spatial_scores": g.reshape((b, l) + g.shape[1:]),
        "stripe_attention": attention,
        "frame_weights": jnp.mean(attention, axis=-1),
    }

  def embed_all_frames(self, frames: Any, chunk: int | None = None) -> jax.Array:
    """All T frames of one tracklet (T, H, W, 3) -> embedding (embed_dim,), one attention pass.

    The backbone runs on `chunk` frames at a time (default `config.model.sta.eval_chunk`; the
    last chunk is zero-padded so one compiled shape serves every tracklet); only the small
    stripe vectors and scores of all T frames are kept, then S is normalised over all T frames.
    Needs `model.eval()` (BatchNorm on running statistics).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
      raise ValueError(
          f"embed_all_frames: expected frames (T >= 1, H, W, 3), got shape {tuple(frames.shape)}")
    if not self.bn.use_running_average:
      raise ValueError("embed_all_frames: call model.eval() first (BatchNorm is in training mode)")
    chunk = int(chunk or self.eval_chunk)
    if chunk < 1:
      raise ValueError(f"embed_all_frames: chunk must be >= 1, got {chunk}")
    t = frames.shape[0]
    vs, ss = [], []
    for start in range(0, t, chunk):
      x = jnp.asarray(frames[start:start + chunk])
      n = x.shape[0]
      if n < chunk:
        x = jnp.concatenate([x, jnp.zeros((chunk - n,) + x.shape[1:], x.dtype)])
      v, s = _stripes_jit(self, x)
      vs.append(v[:n])
      ss.append(s[:n])
    return _fuse_head_jit(self, jnp.concatenate(vs)[None], jnp.concatenate(ss)[None])[0]


@nnx.jit
def _stripes_jit(model: STA, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
  v, s, _ = model.frame_stripes(frames)
  return v, s


@nnx.jit
def _fuse_head_jit(model: STA, v: jax.Array, s: jax.Array) -> jax.Array:
  return model.head(fuse(v, frame_attention(s)))
