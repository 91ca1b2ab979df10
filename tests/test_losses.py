"""Losses: values against direct NumPy computations and hand-built cases."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stmn_jax import losses


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def test_cross_entropy_matches_numpy_with_and_without_smoothing():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  labels = np.array([0, 3, 6, 2, 2])
  logp = np.log(_np_softmax(logits.astype(np.float64)))
  plain = -np.mean(logp[np.arange(5), labels])
  eps = 0.1
  targets = np.full((5, 7), eps / 7)
  targets[np.arange(5), labels] += 1 - eps
  smooth = -np.mean(np.sum(targets * logp, axis=1))
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), plain, rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, eps), smooth, rtol=1e-5)
  assert abs(plain - smooth) > 1e-3  # smoothing changes the value


def test_cross_entropy_frame_level_averages_logits_over_frames():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 6)).astype(np.float32)
  labels = np.array([1, 5, 0])
  mean_logits = logits.mean(axis=1)
  expected = -np.mean(np.log(_np_softmax(mean_logits))[np.arange(3), labels])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(logits, labels[:2])


def _triplet_case():
  # 1-D features on a line so every distance is known.
  # id 0: anchors at 0.0, 1.0, 3.0; id 1: 3.5, 10.0
  f = np.array([[0.0], [1.0], [3.0], [3.5], [10.0]], np.float32)
  y = np.array([0, 0, 0, 1, 1])
  # hardest positive / negative per anchor, by hand:
  hp = np.array([3.0, 2.0, 3.0, 6.5, 6.5])
  hn = np.array([3.5, 2.5, 0.5, 0.5, 7.0])
  return f, y, hp, hn


def test_batch_hard_triplet_mines_hardest_pairs_soft_and_hard_margin():
  f, y, hp, hn = _triplet_case()
  z = np.sqrt((hp ** 2) + 1e-12) - np.sqrt(hn ** 2 + 1e-12)
  np.testing.assert_allclose(
      losses.batch_hard_triplet(f, y), np.mean(np.log1p(np.exp(z))), rtol=1e-5)
  np.testing.assert_allclose(
      losses.batch_hard_triplet(f, y, margin=0.0), np.mean(np.log1p(np.exp(z))), rtol=1e-5)
  np.testing.assert_allclose(
      losses.batch_hard_triplet(f, y, margin=0.3), np.mean(np.maximum(z + 0.3, 0)), rtol=1e-5)


def test_batch_hard_triplet_excludes_self_and_matches_brute_force():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(8, 5)).astype(np.float32)
  y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1) + 1e-12)
  vals = []
  for i in range(8):
    pos = [d[i, j] for j in range(8) if y[j] == y[i] and j != i]
    neg = [d[i, j] for j in range(8) if y[j] != y[i]]
    vals.append(max(pos) - min(neg))
  z = np.array(vals)
  np.testing.assert_allclose(
      losses.batch_hard_triplet(f, y, margin=0.5), np.mean(np.maximum(z + 0.5, 0)), rtol=1e-5)
  # a singleton identity has no positive: it is left out of the mean
  y2 = np.array([0, 0, 1, 1, 2, 2, 3, 4])
  keep = [i for i in range(8) if y2[i] not in (3, 4)]
  z2 = []
  for i in keep:
    pos = [d[i, j] for j in range(8) if y2[j] == y2[i] and j != i]
    neg = [d[i, j] for j in range(8) if y2[j] != y2[i]]
    z2.append(max(pos) - min(neg))
  np.testing.assert_allclose(
      losses.batch_hard_triplet(f, y2), np.mean(np.log1p(np.exp(z2))), rtol=1e-5)
  g = jax.grad(lambda x: losses.batch_hard_triplet(x, y2))(jnp.asarray(f))
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_memory_spread_loss_uniform_onehot_and_numpy():
  m = 10
  uniform = np.full((50, m), 1.0 / m, np.float32)
  np.testing.assert_allclose(losses.memory_spread_loss(uniform, 0.3), 0.3, rtol=1e-6)
  onehot = np.eye(m, dtype=np.float32)[np.arange(40) % m]
  np.testing.assert_allclose(losses.memory_spread_loss(onehot, 0.3), 0.0, atol=1e-7)
  rng = np.random.default_rng(3)
  p = _np_softmax(rng.normal(size=(2, 3, 4, 5)) * 0.3).astype(np.float32)
  flat = p.reshape(-1, 5)
  expected = np.mean(np.maximum(0.3 - (flat.max(0) - flat.min(0)), 0))
  assert expected > 0
  np.testing.assert_allclose(losses.memory_spread_loss(p, 0.3), expected, rtol=1e-5)


def test_diversity_regularizer_paper_and_code_variants():
  rng = np.random.default_rng(4)
  att = _np_softmax(rng.normal(size=(2, 3, 4, 6)), axis=-1).astype(np.float32)
  q = np.sqrt(att.reshape(-1, 4, 6).astype(np.float64))
  r = np.array([np.sum((qi @ qi.T - np.eye(4)) ** 2) for qi in q])
  np.testing.assert_allclose(losses.diversity_regularizer(att), r.mean(), rtol=1e-5)
  np.testing.assert_allclose(
      losses.diversity_regularizer(att, "code"), np.sqrt(r.sum() + 1e-5), rtol=1e-5)
  # disjoint one-hot maps are perfectly diverse
  disjoint = np.eye(6, dtype=np.float32)[:4][None]
  np.testing.assert_allclose(losses.diversity_regularizer(disjoint), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="reduction"):
    losses.diversity_regularizer(att, "sum")


def test_interframe_regularizer_uses_distinct_frames():
  rng = np.random.default_rng(5)
  maps = rng.random(size=(6, 4, 3, 2)).astype(np.float32)
  key = jax.random.key(7)
  i, j = losses.interframe_frame_pairs(key, 6, 4)
  i, j = np.asarray(i), np.asarray(j)
  assert np.all(i != j) and np.all((0 <= i) & (i < 4)) and np.all((0 <= j) & (j < 4))
  expected = np.mean([np.linalg.norm(maps[b, i[b]] - maps[b, j[b]]) for b in range(6)])
  np.testing.assert_allclose(losses.interframe_regularizer(maps, key), expected, rtol=1e-5)
  same = np.repeat(maps[:, :1], 4, axis=1)
  np.testing.assert_allclose(losses.interframe_regularizer(same, key), 0.0, atol=1e-7)
  g = jax.grad(lambda x: losses.interframe_regularizer(x, key))(jnp.asarray(same))
  assert np.all(np.isfinite(g))
  with pytest.raises(ValueError, match="2 frames"):
    losses.interframe_regularizer(maps[:, :1], key)


def _loss_config(**kw):
  c = ml_collections.ConfigDict()
  c.loss = ml_collections.ConfigDict(dict(
      ce_weight=1.0, label_smoothing=0.0, triplet_weight=1.0, triplet_margin=0.0,
      spread_weight=1.0, spread_margin=0.3))
  c.loss.update(kw)
  return c


def test_total_loss_sums_terms_by_name():
  rng = np.random.default_rng(6)
  b, l, c, d = 4, 3, 5, 6
  y = np.array([0, 0, 1, 1])
  out = dict(
      frame_logits=rng.normal(size=(b, l, c)).astype(np.float32),
      seq_logits=rng.normal(size=(b, c)).astype(np.float32),
      frame_feats=rng.normal(size=(b, l, d)).astype(np.float32),
      seq_feats=rng.normal(size=(b, d)).astype(np.float32),
      spatial_probs=_np_softmax(rng.normal(size=(b, l, 4, 3))).astype(np.float32),
      temporal_probs=_np_softmax(rng.normal(size=(b, 2))).astype(np.float32),
  )
  config = _loss_config(triplet_weight=2.0)
  loss, terms = losses.total_loss(out, {"pid": y}, config)
  expected = dict(
      ce_frame=losses.cross_entropy(out["frame_logits"].mean(1), y),
      ce_seq=losses.cross_entropy(out["seq_logits"], y),
      triplet_frame=losses.batch_hard_triplet(out["frame_feats"].mean(1), y),
      triplet_seq=losses.batch_hard_triplet(out["seq_feats"], y),
      spread_spatial=losses.memory_spread_loss(out["spatial_probs"], 0.3),
      spread_temporal=losses.memory_spread_loss(out["temporal_probs"], 0.3),
  )
  assert set(terms) == set(expected)
  for k in expected:
    np.testing.assert_allclose(terms[k], expected[k], rtol=1e-6)
  total = sum(v * (2.0 if k.startswith("triplet") else 1.0) for k, v in expected.items())
  np.testing.assert_allclose(loss, total, rtol=1e-6)
  # spread off (ablation presets) and bf16 outputs still give float32 losses
  out16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in out.items()}
  loss2, terms2 = losses.total_loss(out16, {"pid": y}, _loss_config(spread_weight=0.0))
  assert "spread_spatial" not in terms2 and loss2.dtype == jnp.float32


def test_total_loss_drsa_and_sta_terms():
  rng = np.random.default_rng(8)
  y = np.array([0, 0, 1, 1])
  att = _np_softmax(rng.normal(size=(4, 3, 2, 5))).astype(np.float32)
  scores = rng.random(size=(4, 3, 2, 2)).astype(np.float32)
  out = dict(seq_logits=rng.normal(size=(4, 3)).astype(np.float32),
             part_attention=att, spatial_scores=scores)
  config = _loss_config(diversity_weight=0.5, interframe_weight=3e-4)
  key = jax.random.key(1)
  loss, terms = losses.total_loss(out, {"pid": y}, config, rng=key)
  np.testing.assert_allclose(terms["diversity"], losses.diversity_regularizer(att), rtol=1e-6)
  np.testing.assert_allclose(
      terms["interframe"], losses.interframe_regularizer(scores, key), rtol=1e-6)
  np.testing.assert_allclose(
      loss, terms["ce_seq"] + 0.5 * terms["diversity"] + 3e-4 * terms["interframe"], rtol=1e-6)
  with pytest.raises(ValueError, match="rng"):
    losses.total_loss(out, {"pid": y}, config)
