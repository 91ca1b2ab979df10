"""Tiny stand-in model and loss for the engine tests (sharding, checkpoints, train step).

The model follows the outputs-dict contract of docs/ARCHITECTURE.md with a few parameters; the
loss mixes cross-entropy with batch-hard triplet mining over the whole batch, so that a
sharded step only matches an unsharded one when statistics and mining are global.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx


class TinyVideoModel(nnx.Module):
  """(B, L, H, W, 3) -> {"embedding" (B, D), "seq_feats" (B, D), "seq_logits" (B, C)}."""

  def __init__(self, num_classes: int, rngs: nnx.Rngs, dim: int = 8):
    self.conv = nnx.Conv(3, 4, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.proj = nnx.Linear(4, dim, use_bias=False, rngs=rngs)
    self.neck = nnx.BatchNorm(dim, rngs=rngs)
    self.cls = nnx.Linear(dim, num_classes, use_bias=False, rngs=rngs)

  def __call__(self, frames):
    b, l = frames.shape[:2]
    x = frames.reshape((b * l,) + frames.shape[2:])
    x = nnx.relu(self.bn(self.conv(x)))
    x = x.mean(axis=(1, 2)).reshape(b, l, -1).mean(axis=1)
    feats = self.proj(x)
    emb = self.neck(feats)
    return {"embedding": emb, "seq_feats": feats, "seq_logits": self.cls(emb)}


def tiny_model_fn(config, num_classes, rngs):
  del config
  return TinyVideoModel(num_classes, rngs)


def tiny_loss_fn(outputs, batch, config, rng=None):
  """CE + soft-margin batch-hard triplet (global over the batch) -> (loss, terms)."""
  del config, rng
  labels = batch["pid"]
  ce = optax.softmax_cross_entropy_with_integer_labels(outputs["seq_logits"], labels).mean()
  f = outputs["seq_feats"]
  d = jnp.sqrt(jnp.sum((f[:, None] - f[None]) ** 2, -1) + 1e-12)
  same = labels[:, None] == labels[None]
  hardest_pos = jnp.max(jnp.where(same, d, -jnp.inf), axis=1)
  hardest_neg = jnp.min(jnp.where(same, jnp.inf, d), axis=1)
  tri = jnp.mean(jax.nn.softplus(hardest_pos - hardest_neg))
  return ce + tri, {"ce": ce, "triplet": tri}


def tiny_config() -> ml_collections.ConfigDict:
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config("smoke")
  config.data.height, config.data.width, config.data.seq_len = 16, 8, 2
  config.data.num_ids_per_batch, config.data.num_tracklets_per_id = 4, 2
  return config


def random_batch(seed: int, batch: int = 8, ids: int = 4, shape=(2, 16, 8)) -> dict:
  rs = np.random.RandomState(seed)
  return {
      "frames": rs.randn(batch, *shape, 3).astype(np.float32),
      "pid": (np.arange(batch) % ids).astype(np.int32),
      "camid": rs.randint(0, 3, size=batch).astype(np.int32),
  }
