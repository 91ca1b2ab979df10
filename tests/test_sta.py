"""STA: the parameter-free attention, fusion, inter-frame regulariser, model and all-frames pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from stmn_jax import losses
from stmn_jax.models import sta

B, L, H, W = 2, 3, 64, 32


def _smoke_config(**sta_overrides):
  config = synthetic.get_config("sta,smoke")
  for key, value in sta_overrides.items():
    config.model.sta[key] = value
  return config


def _rand(*shape, seed=0, positive=False):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return np.abs(x) if positive else x


# ------------------------------------------------------------------ attention pieces


def test_paper_scores_are_l1_normalised_squared_norms():
  f = _rand(3, 8, 4, 5, seed=1)
  g = np.asarray(sta.spatial_scores(jnp.asarray(f), "paper"))
  q = (f ** 2).sum(-1)
  np.testing.assert_allclose(g, q / q.sum(axis=(1, 2), keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(g.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_torchreid_scores_are_l2_normalised_norms():
  f = _rand(3, 8, 4, 5, seed=2)
  g = np.asarray(sta.spatial_scores(jnp.asarray(f), "torchreid"))
  q = np.linalg.norm(f, axis=-1)
  np.testing.assert_allclose(g, q / np.linalg.norm(q.reshape(3, -1), axis=1)[:, None, None],
                             rtol=1e-4)
  with pytest.raises(ValueError, match="config.model.sta.attention"):
    sta.spatial_scores(jnp.asarray(f), "softmax")


def test_stripes_cover_rows_in_order():
  np.testing.assert_array_equal(sta.stripe_matrix(16, 4).argmax(1), np.repeat(np.arange(4), 4))
  np.testing.assert_array_equal(sta.stripe_matrix(6, 4).argmax(1), [0, 0, 1, 1, 2, 3])
  with pytest.raises(ValueError, match="num_stripes"):
    sta.stripe_matrix(2, 4)


def test_stripe_scores_and_vectors():
  f = _rand(2, 8, 3, 5, seed=3)
  g = np.asarray(sta.spatial_scores(jnp.asarray(f)))
  s = np.asarray(sta.stripe_scores(jnp.asarray(g), 4))
  v = np.asarray(sta.stripe_vectors(jnp.asarray(f), 4))
  for k in range(4):
    rows = slice(2 * k, 2 * k + 2)
    np.testing.assert_allclose(s[:, k], g[:, rows].sum(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(v[:, k], f[:, rows].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-5)  # the stripes partition the map
  s_mean = np.asarray(sta.stripe_scores(jnp.asarray(g), 4, "torchreid"))
  np.testing.assert_allclose(s_mean, s / 6.0, rtol=1e-5)  # 2 rows x 3 columns per stripe


def test_attention_columns_sum_to_one_over_frames():
  s = _rand(2, 5, 4, seed=4, positive=True)
  a = np.asarray(sta.frame_attention(jnp.asarray(s)))
  np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(a, s / s.sum(axis=1, keepdims=True), rtol=1e-5)


def test_fusing_stripe_vectors_equals_fusing_region_maps():
  b, l, h, w, c, k = 2, 4, 8, 4, 6, 4
  f = _rand(b, l, h, w, c, seed=5)
  g = np.asarray(sta.spatial_scores(jnp.asarray(f.reshape(b * l, h, w, c))))
  s = np.asarray(sta.stripe_scores(jnp.asarray(g), k)).reshape(b, l, k)
  att = s / s.sum(axis=1, keepdims=True)
  # Map level (the paper): per stripe, the region of the best frame and the S-weighted sum of the
  # regions; the fused maps are stacked back into (h, w, 2c) and globally average-pooled.
  rows = h // k
  fused_maps = np.zeros((b, h, w, 2 * c), np.float32)
  for i in range(b):
    for j in range(k):
      region = f[i, :, j * rows:(j + 1) * rows]  # (L, rows, w, c)
      fused_maps[i, j * rows:(j + 1) * rows, :, :c] = region[att[i, :, j].argmax()]
      fused_maps[i, j * rows:(j + 1) * rows, :, c:] = np.einsum("l,lrwc->rwc", att[i, :, j], region)
  direct = fused_maps.mean(axis=(1, 2))
  v = sta.stripe_vectors(jnp.asarray(f.reshape(b * l, h, w, c)), k).reshape(b, l, k, c)
  got = np.asarray(sta.fuse(v, jnp.asarray(att)))
  np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ inter-frame regulariser


def test_interframe_regulariser_on_hand_made_maps():
  # Two frames per tracklet, so the random pair is always {0, 1}.
  g = np.zeros((3, 2, 2, 2), np.float32)
  g[0, 0, 0, 0] = g[0, 1, 1, 1] = 1.0  # disjoint one-hot maps: ||g0 - g1|| = sqrt(2)
  g[1, :] = 0.25  # identical maps: 0
  g[2, 0] = [[0.5, 0.5], [0.0, 0.0]]
  g[2, 1] = [[0.5, 0.0], [0.5, 0.0]]  # difference (0, .5, -.5, 0): norm sqrt(0.5)
  value = losses.interframe_regularizer(jnp.asarray(g), jax.random.key(0))
  np.testing.assert_allclose(value, (np.sqrt(2.0) + 0.0 + np.sqrt(0.5)) / 3.0, rtol=1e-5)


def test_interframe_regulariser_uses_the_drawn_pair():
  g = _rand(4, 5, 3, 2, seed=6, positive=True)
  rng = jax.random.key(3)
  i, j = map(np.asarray, losses.interframe_frame_pairs(rng, 4, 5))
  assert np.all(i != j)
  direct = np.mean([np.linalg.norm(g[n, i[n]] - g[n, j[n]]) for n in range(4)])
  np.testing.assert_allclose(losses.interframe_regularizer(jnp.asarray(g), rng), direct, rtol=1e-5)


# ------------------------------------------------------------------ the model


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="config.model.sta.attention"):
    sta.STA(_smoke_config(attention="softmax"), 5, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model_and_frames():
  model = sta.STA(_smoke_config(), 7, rngs=nnx.Rngs(0))
  model.eval()
  frames = jax.random.normal(jax.random.key(1), (B, L, H, W, 3))
  return model, frames


def test_forward_shapes_and_normalisation(model_and_frames):
  model, frames = model_and_frames
  out = nnx.jit(lambda m, x: m(x))(model, frames)
  h, w, k = H // 16, W // 16, 4  # last stride 1
  assert out["embedding"].shape == (B, 1024)
  assert out["seq_feats"].shape == (B, 1024)
  assert out["seq_logits"].shape == (B, 7)
  assert out["spatial_scores"].shape == (B, L, h, w)
  assert out["stripe_attention"].shape == (B, L, k)
  assert out["frame_weights"].shape == (B, L)
  np.testing.assert_allclose(out["spatial_scores"].sum(axis=(2, 3)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["stripe_attention"].sum(axis=1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(out["embedding"]) >= 0.0)  # after ReLU
  # The head on the directly fused stripe vectors reproduces the embedding and the logits.
  v, s, g = model.frame_stripes(frames.reshape((B * L, H, W, 3)))
  np.testing.assert_allclose(g.reshape(B, L, h, w), out["spatial_scores"], rtol=1e-5)
  att = np.asarray(s).reshape(B, L, k)
  att = att / att.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(out["stripe_attention"], att, rtol=1e-5)
  emb = model.head(sta.fuse(v.reshape(B, L, k, -1), jnp.asarray(att)))
  np.testing.assert_allclose(out["embedding"], emb, rtol=1e-4, atol=1e-5)
  kern = np.asarray(model.classifier.kernel[...])
  np.testing.assert_allclose(out["seq_logits"], np.asarray(emb) @ kern, rtol=1e-4, atol=1e-6)


def test_all_frames_pass_equals_one_clip_of_all_frames(model_and_frames):
  model, frames = model_and_frames
  tracklet = jax.random.normal(jax.random.key(2), (5, H, W, 3))
  whole = nnx.jit(lambda m, x: m(x)["embedding"])(model, tracklet[None])[0]
  chunked = model.embed_all_frames(np.asarray(tracklet), chunk=2)  # chunks 2 + 2 + 1 (padded)
  np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5)
  model.train()
  try:
    with pytest.raises(ValueError, match="model.eval"):
      model.embed_all_frames(np.asarray(tracklet), chunk=2)
  finally:
    model.eval()


def test_merge_chunk_summaries_is_the_module_merge_on_numpy(model_and_frames):
  # The whole-tracklet protocol's host-side merge: `merge_summaries(first, then, xp=np)`.
  model, frames = model_and_frames
  mask = np.array([[True, True, True], [True, False, False]])
  first = jax.device_get(nnx.jit(lambda m, x, k: m.chunk_summary(x, k))(model, frames, mask))
  rs = np.random.default_rng(3)
  then = sta.StripeSummary(*(np.asarray(x) + rs.normal(size=np.shape(x)).astype(np.float32)
                             for x in first))
  then = then._replace(best_score=np.where(rs.random(first.best_score.shape) < 0.5,
                                           first.best_score, then.best_score))  # ties: first wins
  got = model.merge_chunk_summaries(first, then)
  expected = sta.merge_summaries(first, then, xp=np)
  assert isinstance(got, sta.StripeSummary)
  for a, b in zip(got, expected):
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, b)
  for a, b in zip(model.merge_chunk_summaries(tuple(first), tuple(then)), expected):
    np.testing.assert_array_equal(a, b)  # plain tuples of the leaves, e.g. after jax.tree.map


def test_interframe_gradient_reaches_the_backbone(model_and_frames):
  # The attention has no parameters: the regulariser trains the backbone through g.
  model, frames = model_and_frames
  model.train()

  def loss_fn(m):
    return losses.interframe_regularizer(m(frames)["spatial_scores"], jax.random.key(0))

  try:
    grads = nnx.jit(nnx.grad(loss_fn))(model)
  finally:
    model.eval()
  stage = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads.stage)])
  assert np.all(np.isfinite(stage)) and np.abs(stage).max() > 0
  head = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads.reduce)])
  np.testing.assert_array_equal(head, 0.0)  # the head does not touch g
