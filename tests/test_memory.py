"""Spatial and temporal memories against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmn_jax.models import memory


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_logits(q, k, similarity):
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  if similarity == "cosine":
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
  else:  # official code: each feature dimension normalised over the slots
    kn = k / np.linalg.norm(k, axis=0, keepdims=True)
  return qn @ kn.T


def _np_spatial(query, value, keys, values, gamma, beta, similarity, layout, eps=1e-5):
  """Direct NumPy spatial memory in training mode; returns refined, probs."""
  n, h, w, d = query.shape
  if layout == "per_location":
    rows = query.reshape(n * h * w, d)
  else:  # torch-style: NCHW tensor .reshape(-1, D)
    rows = query.transpose(0, 3, 1, 2).reshape(-1, d)
  a = _softmax(_np_logits(rows, keys, similarity))
  r = a @ values
  r = (r - r.mean(0)) / np.sqrt(r.var(0) + eps) * gamma + beta
  if layout == "per_location":
    r_map = r.reshape(n, h, w, d)
  else:
    r_map = r.reshape(n, d, h, w).transpose(0, 2, 3, 1)
  return value - r_map, a.reshape(n, h * w, -1)


@pytest.mark.parametrize("similarity", ["cosine", "code"])
@pytest.mark.parametrize("layout", ["per_location", "nchw_flat"])
def test_spatial_memory_matches_numpy(similarity, layout):
  d, m = 12, 5
  mem = memory.SpatialMemory(d, m, layout=layout, similarity=similarity, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  # non-zero BN scale / bias so the read-out actually changes the features
  gamma = rng.normal(size=d).astype(np.float32)
  beta = rng.normal(size=d).astype(np.float32)
  mem.bn.scale.value = jnp.asarray(gamma)
  mem.bn.bias.value = jnp.asarray(beta)
  q = rng.normal(size=(3, 4, 2, d)).astype(np.float32)
  v = rng.random(size=(3, 4, 2, d)).astype(np.float32)
  refined, probs = mem(jnp.asarray(q), jnp.asarray(v))
  keys = np.asarray(mem.mem_keys.value, np.float64)
  values = np.asarray(mem.mem_values.value, np.float64)
  exp_ref, exp_probs = _np_spatial(
      q.astype(np.float64), v.astype(np.float64), keys, values, gamma, beta, similarity, layout)
  np.testing.assert_allclose(probs, exp_probs, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(refined, exp_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_similarity_modes_and_layouts_differ():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(7, 16)).astype(np.float32)
  k = rng.normal(size=(4, 16)).astype(np.float32)
  cos = np.asarray(memory.memory_logits(q, k, "cosine"))
  code = np.asarray(memory.memory_logits(q, k, "code"))
  assert np.all(np.abs(cos) <= 1 + 1e-5)
  assert np.abs(code).max() > 1.0  # the code's keys are not unit vectors: ~sqrt(D/M) norms
  x = rng.normal(size=(2, 3, 2, 6)).astype(np.float32)
  for layout in memory.LAYOUTS:
    rows = memory.to_query_rows(jnp.asarray(x), layout)
    np.testing.assert_array_equal(memory.from_query_rows(rows, 3, 2, layout), x)
  np.testing.assert_array_equal(memory.to_query_rows(jnp.asarray(x), "per_location")[0, 1], x[0, 0, 1])
  np.testing.assert_array_equal(
      memory.to_query_rows(jnp.asarray(x), "nchw_flat")[0, 0], x[0].transpose(2, 0, 1).ravel()[:6])
  with pytest.raises(ValueError, match="smem_layout"):
    memory.SpatialMemory(6, 3, layout="nhwc", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="memory_similarity"):
    memory.SpatialMemory(6, 3, similarity="dot", rngs=nnx.Rngs(0))


def test_spatial_memory_init_is_identity_and_param_init():
  mem = memory.SpatialMemory(32, 10, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 4, 2, 32)).astype(np.float32)
  v = rng.random(size=(2, 4, 2, 32)).astype(np.float32)
  refined, _ = mem(jnp.asarray(q), jnp.asarray(v))
  np.testing.assert_allclose(refined, v, atol=1e-6)  # BN gamma = beta = 0 at init
  keys = np.asarray(mem.mem_keys.value)
  assert isinstance(mem.mem_keys, nnx.Param) and isinstance(mem.mem_values, nnx.Param)
  assert abs(keys.mean()) < 0.2 and 0.8 < keys.std() < 1.2


def _np_lstm(xs, wi, wh, b):
  """flax OptimizedLSTMCell math (gates i, f, g, o) in NumPy. xs (B, L, D) -> h_L (B, H)."""
  bsz, hdim = xs.shape[0], wh.shape[0]
  h = np.zeros((bsz, hdim))
  c = np.zeros((bsz, hdim))
  sig = lambda z: 1 / (1 + np.exp(-z))
  for t in range(xs.shape[1]):
    z = xs[:, t] @ wi + h @ wh + b
    i, f, g, o = np.split(z, 4, axis=-1)
    c = sig(f) * c + sig(i) * np.tanh(g)
    h = sig(o) * np.tanh(c)
  return h


@pytest.mark.parametrize("similarity", ["cosine", "code"])
def test_temporal_memory_matches_numpy_and_weights_sum_to_one(similarity):
  d, n, length = 8, 3, 5
  mem = memory.TemporalMemory(d, n, length, similarity=similarity, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(4)
  q = rng.normal(size=(2, length, d)).astype(np.float32)
  f = rng.random(size=(2, length, d)).astype(np.float32)
  seq, probs, weights = mem(jnp.asarray(q), jnp.asarray(f))
  cell = mem.lstm
  wi = np.asarray(cell.dense_i.kernel.value, np.float64)
  wh = np.asarray(cell.dense_h.kernel.value, np.float64)
  b = np.asarray(cell.dense_h.bias.value, np.float64)
  h = _np_lstm(q.astype(np.float64), wi, wh, b)
  p = _softmax(_np_logits(h, np.asarray(mem.mem_keys.value, np.float64), similarity))
  w = _softmax(p @ np.asarray(mem.mem_values.value, np.float64))
  np.testing.assert_allclose(probs, p, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(weights, w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(seq, np.einsum("bl,bld->bd", w, f), rtol=1e-4, atol=1e-6)
  vals = np.asarray(mem.mem_values.value)
  assert vals.shape == (n, length) and vals.min() >= 0 and vals.max() < 1
  with pytest.raises(ValueError, match="seq_len"):
    mem(jnp.asarray(q[:, :4]), jnp.asarray(f[:, :4]))


def test_gradients_reach_memory_keys_and_values():
  smem = memory.SpatialMemory(8, 4, rngs=nnx.Rngs(0))
  smem.bn.scale.value = jnp.ones(8)  # gamma = 0 at init blocks the values' gradient
  tmem = memory.TemporalMemory(8, 3, 4, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, 4, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.random(size=(2, 4, 2, 8)), jnp.float32)
  tq = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  tf = jnp.asarray(rng.random(size=(2, 4, 8)), jnp.float32)

  def sloss(m):
    refined, probs = m(q, v)
    return jnp.sum(refined ** 2) + jnp.sum(probs[..., 0])

  def tloss(m):
    seq, probs, _ = m(tq, tf)
    return jnp.sum(seq * jnp.arange(8.0)) + probs[0, 0]

  gs = nnx.grad(sloss)(smem)
  gt = nnx.grad(tloss)(tmem)
  for g in (gs["mem_keys"], gs["mem_values"], gt["mem_keys"], gt["mem_values"]):
    arr = np.asarray(g.value)
    assert np.all(np.isfinite(arr)) and np.abs(arr).max() > 0


@pytest.mark.parametrize("similarity", ["cosine", "code"])
def test_bfloat16_memories_address_and_weight_frames_in_float32(similarity):
  """Under bfloat16 compute, what follows the bfloat16 inputs (the spatial queries, the LSTM's
  output) is float32: addressing probabilities and frame weights match float64 NumPy on the same
  values to float32 precision, and so does the gradient that reaches the temporal memory's values
  through the frame weights, although the L frames' features differ by only ~1%: it needs the
  differences <dL/dseq, f_l - f_m>, which a bfloat16 frame-weighted sum rounds away."""
  bf16 = jnp.bfloat16
  d, m, n, length = 32, 5, 3, 4
  rng = np.random.default_rng(6)
  smem = memory.SpatialMemory(d, m, similarity=similarity, dtype=bf16, rngs=nnx.Rngs(0))
  q = jnp.asarray(rng.normal(size=(2, 4, 2, d)), bf16)
  probs = smem.address(q)
  assert probs.dtype == jnp.float32
  keys = np.asarray(smem.mem_keys[...], np.float64)
  expected = _softmax(_np_logits(np.asarray(q, np.float64).reshape(-1, d), keys, similarity))
  np.testing.assert_allclose(probs.reshape(-1, m), expected, rtol=1e-5, atol=1e-7)

  tmem = memory.TemporalMemory(d, n, length, similarity=similarity, dtype=bf16, rngs=nnx.Rngs(1))
  tq = jnp.asarray(rng.normal(size=(3, length, d)), bf16)
  common = rng.random(size=(3, 1, d)) + 0.5
  tf = jnp.asarray(common * (1 + 0.01 * rng.normal(size=(3, length, d))), bf16)
  r = jnp.asarray(rng.normal(size=(3, d)), bf16).astype(jnp.float32)  # exact in bf16
  seq, tprobs, weights = tmem(tq, tf)
  assert seq.dtype == bf16 and tprobs.dtype == weights.dtype == jnp.float32
  context = np.asarray(tmem.encode(tq), np.float64)  # the bf16 LSTM's output
  p = _softmax(_np_logits(context, np.asarray(tmem.mem_keys[...], np.float64), similarity))
  w = _softmax(p @ np.asarray(tmem.mem_values[...], np.float64))
  np.testing.assert_allclose(tprobs, p, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(weights, w, rtol=1e-5, atol=1e-7)
  f = np.asarray(tf, np.float64)
  np.testing.assert_allclose(
      np.asarray(seq, np.float64), np.einsum("bl,bld->bd", w, f), rtol=2 ** -8)  # bf16 output
  grad = nnx.grad(lambda mod: jnp.sum(mod(tq, tf)[0].astype(jnp.float32) * r))(tmem)
  dw = np.einsum("bd,bld->bl", np.asarray(r, np.float64), f)  # dL/dweights
  da = w * (dw - np.sum(w * dw, axis=1, keepdims=True))  # through the softmax over frames
  expected_dv = p.T @ da  # (N, L)
  got = np.asarray(grad["mem_values"][...], np.float64)
  rel = np.linalg.norm(got - expected_dv) / np.linalg.norm(expected_dv)
  assert rel <= 1e-4, rel


def _two_bias_memory(d=8, n=3, length=4):
  return memory.TemporalMemory(d, n, length, lstm_biases=2, rngs=nnx.Rngs(3))


def test_two_bias_lstm_forward_is_the_one_bias_lstm_with_the_summed_bias():
  """`lstm_biases=2`: the same kernels and bias_hh as the one-bias cell drawn from the same
  rngs, a separate bias_ih, both U(-k, k), and the forward pass of b_ih + b_hh as one bias."""
  d, length = 8, 4
  two = _two_bias_memory(d, 3, length)
  one = memory.TemporalMemory(d, 3, length, rngs=nnx.Rngs(3))
  assert isinstance(two.lstm, memory.TwoBiasLSTMCell)
  assert type(one.lstm) is nnx.OptimizedLSTMCell
  np.testing.assert_array_equal(two.lstm.dense_i.kernel[...], one.lstm.dense_i.kernel[...])
  np.testing.assert_array_equal(two.lstm.dense_h.kernel[...], one.lstm.dense_h.kernel[...])
  np.testing.assert_array_equal(two.lstm.dense_h.bias[...], one.lstm.dense_h.bias[...])
  b_ih, b_hh = np.asarray(two.lstm.bias_ih[...]), np.asarray(two.lstm.dense_h.bias[...])
  k = 1.0 / d ** 0.5
  assert b_ih.shape == (4 * d,) and np.all(np.abs(b_ih) <= k) and np.all(np.abs(b_hh) <= k)
  assert not np.allclose(b_ih, b_hh)
  params = nnx.state(two, nnx.Param)
  assert "bias_ih" in params["lstm"] and "bias" in params["lstm"]["dense_h"]
  # one-bias memory with every parameter of `two`, its bias = b_ih + b_hh
  one.lstm.dense_h.bias[...] = jnp.asarray(b_ih + b_hh)
  for name in ("mem_keys", "mem_values"):
    getattr(one, name)[...] = getattr(two, name)[...]
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(3, length, d)), jnp.float32)
  f = jnp.asarray(rng.normal(size=(3, length, d)), jnp.float32)
  for a, b in zip(two(q, f), one(q, f)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="lstm_biases"):
    memory.TemporalMemory(d, 3, length, lstm_biases=3, rngs=nnx.Rngs(0))


def test_two_bias_lstm_adam_step_moves_each_bias_by_its_own_update():
  """One step of the project's optimizer (train_state.create_optimizer: coupled L2 + Adam):
  both biases get the gradient of the summed bias, plus each its own weight decay term, and
  each moves by its own Adam update, -lr * g / (|g| + eps) at the first step."""
  from configs import mars
  from stmn_jax import train_state

  config = mars.get_config("stmn")
  config.optim.weight_decay = 0.05  # large enough that the two updates differ visibly
  lr, eps = config.optim.learning_rate, 1e-8
  tx, _ = train_state.create_optimizer(config, steps_per_epoch=10)
  mem = _two_bias_memory()
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
  f = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  loss = lambda m: jnp.vdot(cot, m(q, f)[0])
  grads = nnx.grad(loss)(mem)
  # the gradient of a one-bias LSTM with the summed bias, computed apart
  one = memory.TemporalMemory(8, 3, 4, rngs=nnx.Rngs(3))
  nnx.update(one, nnx.state(mem, nnx.Param).filter(lambda p, _: "bias_ih" not in p))
  before_ih = np.asarray(mem.lstm.bias_ih[...], np.float64)
  before_hh = np.asarray(mem.lstm.dense_h.bias[...], np.float64)
  one.lstm.dense_h.bias[...] = jnp.asarray(before_ih + before_hh, jnp.float32)
  g_sum = np.asarray(nnx.grad(loss)(one).lstm.dense_h.bias[...], np.float64)
  np.testing.assert_allclose(grads.lstm.bias_ih[...], g_sum, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads.lstm.dense_h.bias[...], g_sum, rtol=1e-5, atol=1e-7)
  optimizer = nnx.Optimizer(mem, tx, wrt=nnx.Param)
  optimizer.update(mem, grads)
  for before, after in ((before_ih, mem.lstm.bias_ih[...]), (before_hh, mem.lstm.dense_h.bias[...])):
    g = g_sum + config.optim.weight_decay * before
    expected_step = -lr * g / (np.abs(g) + eps)
    # float32 parameters of ~0.3: one rounding is ~3e-8, 0.03% of lr
    np.testing.assert_allclose(np.asarray(after, np.float64) - before, expected_step, rtol=0,
                               atol=1e-3 * lr)
  moved = (np.asarray(mem.lstm.bias_ih[...]) - before_ih) + (
      np.asarray(mem.lstm.dense_h.bias[...]) - before_hh)
  assert np.max(np.abs(moved)) > 1.9 * lr  # the sum moves by up to 2 lr


@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
def test_readout_bn_running_variance(running_var):
  """The read-out BN's running variance: m * 1 + (1 - m) * v, v the batch variance of the
  N*h*w read-out rows, times n / (n - 1) with "unbiased" (PyTorch's)."""
  smem = memory.SpatialMemory(8, 4, bn_running_var=running_var, rngs=nnx.Rngs(0))
  smem.train()
  rng = np.random.default_rng(2)
  query = rng.normal(size=(3, 2, 2, 8)).astype(np.float32)
  smem(jnp.asarray(query), jnp.asarray(query))
  rows = _softmax(_np_logits(query.reshape(-1, 8).astype(np.float64),
                             np.asarray(smem.mem_keys[...], np.float64), "cosine"))
  readout = rows @ np.asarray(smem.mem_values[...], np.float64)
  n = readout.shape[0]
  var = readout.var(0) * (n / (n - 1) if running_var == "unbiased" else 1.0)
  np.testing.assert_allclose(smem.bn.var[...], 0.9 + 0.1 * var, rtol=1e-5)
  np.testing.assert_allclose(smem.bn.mean[...], 0.1 * readout.mean(0), rtol=1e-5, atol=1e-7)
