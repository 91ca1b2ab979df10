"""DRSA: spatial / temporal attention, the diversity regulariser, the model's outputs and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from stmn_jax import losses
from stmn_jax.models import drsa

B, L, H, W = 2, 3, 64, 32


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _smoke_config(**drsa_overrides):
  config = synthetic.get_config("drsa,smoke")
  for key, value in drsa_overrides.items():
    config.model.drsa[key] = value
  return config


# ------------------------------------------------------------------ diversity regulariser


def test_diversity_is_zero_for_disjoint_maps():
  k, p = 4, 12
  maps = np.zeros((3, 2, k, p), np.float32)  # (B, L, K, P), each map on its own locations
  for i in range(k):
    maps[..., i, 3 * i:3 * i + 3] = 1.0 / 3.0
  np.testing.assert_allclose(losses.diversity_regularizer(jnp.asarray(maps)), 0.0, atol=1e-5)


def test_diversity_is_maximal_for_identical_maps():
  k, p = 4, 12
  rng = np.random.default_rng(0)
  one = _softmax(rng.normal(size=(3, 1, p)), -1)
  identical = np.repeat(one[:, :, None], k, axis=2).astype(np.float32)  # (3, 1, K, P)
  # Q Q^T is all ones, so ||Q Q^T - I||^2 = K^2 - K, the largest value any softmax maps reach.
  np.testing.assert_allclose(losses.diversity_regularizer(jnp.asarray(identical)), k * k - k,
                             rtol=1e-5)
  random = _softmax(rng.normal(size=(3, 1, k, p)), -1).astype(np.float32)
  value = float(losses.diversity_regularizer(jnp.asarray(random)))
  q = np.sqrt(random.reshape(-1, k, p))
  direct = np.mean([np.sum((qi @ qi.T - np.eye(k)) ** 2) for qi in q])
  np.testing.assert_allclose(value, direct, rtol=1e-5)
  assert 0.0 < value < k * k - k


# ------------------------------------------------------------------ attention functions


def test_spatial_softmax_sums_to_one_over_locations():
  logits = np.random.default_rng(1).normal(size=(5, 4, 3, 6)).astype(np.float32)  # (N,h,w,K)
  maps = np.asarray(drsa.spatial_softmax(jnp.asarray(logits)))
  assert maps.shape == (5, 6, 12)
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
  # Location l = row * w + col, as the row-major flattening of the map.
  for k in range(6):
    np.testing.assert_allclose(maps[:, k], _softmax(logits[..., k].reshape(5, 12), -1), rtol=1e-5)


def test_attend_parts_is_the_attention_weighted_sum():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
  maps = _softmax(rng.normal(size=(2, 6, 12)), -1).astype(np.float32)
  parts = np.asarray(drsa.attend_parts(jnp.asarray(x), jnp.asarray(maps)))
  direct = np.zeros((2, 6, 5))
  for n in range(2):
    for k in range(6):
      for r in range(4):
        for c in range(3):
          direct[n, k] += maps[n, k, r * 3 + c] * x[n, r, c]
  np.testing.assert_allclose(parts, direct, rtol=1e-5, atol=1e-6)


def test_temporal_pool_softmax_over_frames():
  rng = np.random.default_rng(3)
  parts = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)  # (B, L, K, D)
  scores = rng.normal(size=(2, 5, 3)).astype(np.float32)
  weights, fused = drsa.temporal_pool(jnp.asarray(parts), jnp.asarray(scores))
  weights, fused = np.asarray(weights), np.asarray(fused)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(weights, _softmax(scores, 1), rtol=1e-5)
  direct = np.stack([sum(weights[:, l, k, None] * parts[:, l, k] for l in range(5))
                     for k in range(3)], axis=1)
  np.testing.assert_allclose(fused, direct, rtol=1e-5, atol=1e-6)


def test_per_part_hidden_layers_are_independent():
  k, hidden, c = 3, 4, 8
  att = drsa.SpatialAttention(c, k, hidden, shared_hidden=False, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 2, c)), jnp.float32)
  before = np.asarray(att(x))
  assert before.shape == (2, 4, 2, k)
  kernel = att.conv1.kernel[...]
  att.conv1.kernel[...] = kernel.at[..., :hidden].set(0.0)  # part 0's hidden units only
  after = np.asarray(att(x))
  assert not np.allclose(after[..., 0], before[..., 0])
  np.testing.assert_allclose(after[..., 1:], before[..., 1:], rtol=1e-6)


def test_paper_variant_starts_near_uniform_but_not_identical():
  att = drsa.SpatialAttention(256, 6, 64, rngs=nnx.Rngs(0))
  x = jnp.abs(jnp.asarray(np.random.default_rng(8).normal(size=(4, 4, 2, 256)), jnp.float32))
  logits = np.asarray(att(x))
  assert logits.std() < 0.5  # kaiming fan-out here would give ~10: one-hot maps at init
  maps = np.asarray(drsa.spatial_softmax(jnp.asarray(logits)))
  np.testing.assert_allclose(maps, 1.0 / 8.0, atol=0.05)
  assert np.abs(maps - maps[:, :1]).max() > 1e-4  # the parts differ


def test_shared_hidden_with_batchnorm_variant():
  att = drsa.SpatialAttention(8, 3, 4, shared_hidden=True, use_bn=True, rngs=nnx.Rngs(0))
  assert att.conv1.kernel.shape == (1, 1, 8, 4) and att.conv1.bias is None
  x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 4, 2, 8)), jnp.float32)
  y = np.asarray(att(x))
  # Training-mode BatchNorm (scale 1, bias 0): each part's logits are standardised over the batch.
  np.testing.assert_allclose(y.reshape(-1, 3).mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.reshape(-1, 3).std(0), 1.0, rtol=1e-2)


def test_part_reduction_uses_one_matrix_per_part():
  red = drsa.PartReduction(3, 5, 2, rngs=nnx.Rngs(0))
  red.bias[...] = jnp.arange(6.0).reshape(3, 2)
  x = np.random.default_rng(6).normal(size=(4, 3, 5)).astype(np.float32)
  y = np.asarray(red(jnp.asarray(x)))
  kern, bias = np.asarray(red.kernel[...]), np.asarray(red.bias[...])
  for k in range(3):
    np.testing.assert_allclose(y[:, k], x[:, k] @ kern[k] + bias[k], rtol=1e-5, atol=1e-6)


def test_cosine_classifier():
  clf = drsa.CosineClassifier(4, 3, 30.0, rngs=nnx.Rngs(0))
  x = np.random.default_rng(7).normal(size=(2, 4)).astype(np.float32)
  w = np.asarray(clf.kernel[...])
  cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(np.asarray(clf(jnp.asarray(x))), 30.0 * cos, rtol=1e-4, atol=1e-4)


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="config.model.drsa.classifier"):
    drsa.DRSA(_smoke_config(classifier="oim"), 5, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def model_and_frames():
  model = drsa.DRSA(_smoke_config(), 7, rngs=nnx.Rngs(0))
  frames = jax.random.normal(jax.random.key(1), (B, L, H, W, 3))
  return model, frames


def test_forward_shapes_and_normalisation(model_and_frames):
  model, frames = model_and_frames
  model.eval()
  out = nnx.jit(lambda m, x: m(x))(model, frames)
  k, d = 6, 128
  hw = (H // 32) * (W // 32)  # last stride 2: 2x1 map at 64x32
  assert out["embedding"].shape == (B, k * d)
  assert out["seq_feats"].shape == (B, k * d)
  assert out["seq_logits"].shape == (B, 7)
  assert out["part_attention"].shape == (B, L, k, hw)
  assert out["temporal_attention"].shape == (B, L, k)
  assert out["frame_weights"].shape == (B, L)
  np.testing.assert_allclose(out["part_attention"].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["temporal_attention"].sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["frame_weights"].sum(1), 1.0, rtol=1e-5)
  # Recompute the embedding from the pieces: per-frame parts (unit norm), temporal softmax.
  parts, maps, (h, w) = model.frame_parts(frames.reshape((B * L, H, W, 3)))
  assert (h, w) == (H // 32, W // 32)
  np.testing.assert_allclose(np.linalg.norm(parts, axis=-1), 1.0, rtol=1e-5)
  parts = np.asarray(parts).reshape(B, L, k, d)
  kern, bias = np.asarray(model.temporal.kernel[...]), np.asarray(model.temporal.bias[...])
  t = _softmax(np.einsum("blkd,kd->blk", parts, kern) + bias, 1)
  np.testing.assert_allclose(out["temporal_attention"], t, rtol=1e-4, atol=1e-6)
  expected = np.einsum("blk,blkd->bkd", t, parts).reshape(B, k * d)
  np.testing.assert_allclose(out["embedding"], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["part_attention"].reshape(B * L, k, hw), maps, rtol=1e-5)


def test_gradients_reach_the_attention_parameters(model_and_frames):
  model, frames = model_and_frames
  model.train()
  labels = jnp.array([0, 1])

  def loss_fn(m):
    out = m(frames)
    return (losses.cross_entropy(out["seq_logits"], labels)
            + losses.diversity_regularizer(out["part_attention"]))

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  model.eval()
  for name, g in (("spatial.conv1", grads.spatial.conv1.kernel),
                  ("spatial.conv2", grads.spatial.conv2.kernel),
                  ("temporal", grads.temporal.kernel),
                  ("reduce", grads.reduce.kernel)):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 0, name
