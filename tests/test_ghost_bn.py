"""Ghost BatchNorm (`config.model.bn_groups`, models/batch_norm.py) and the grouped spread loss.

Checked against direct computations: the groups against `torch.chunk`; the BN output and
running statistics against NumPy float64 per group and against `nnx.BatchNorm` applied to each
group alone (equal and unequal groups, the XLA:CPU rewrite and the stock code, both running
statistics modes, biased and unbiased running variance); the same under jit with the batch
sharded over a 4-device mesh; the rewrite's closed-form gradient against autodiff; a whole STMN
in training mode against the same model run on each group alone; the spread loss per group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import mars
from stmn_jax import losses, models, sharding
from stmn_jax.models import batch_norm, resnet

C = 6
MOMENTUM = 0.9


@pytest.mark.parametrize("batch,groups", [(32, 3), (4, 3), (5, 4), (3, 1), (7, 7), (2, 5)])
def test_chunk_sizes_are_torch_chunk(batch, groups):
  torch = pytest.importorskip("torch")
  expected = tuple(len(c) for c in torch.arange(batch).chunk(groups))
  assert batch_norm.chunk_sizes(batch, groups) == expected
  assert batch_norm.chunk_sizes(32, 3) == (11, 11, 10)
  assert batch_norm.tracklet_groups(batch, groups) == (expected if len(expected) > 1 else None)


def test_row_sizes_and_errors():
  assert batch_norm.row_sizes((2, 1), 12) == (8, 4)  # 3 tracklets of 4 rows
  with pytest.raises(ValueError, match="not a multiple"):
    batch_norm.row_sizes((2, 1), 10)
  with pytest.raises(ValueError, match="bn_groups"):
    batch_norm.bn_groups({"bn_groups": 0})
  with pytest.raises(ValueError, match="bn_running_stats"):
    batch_norm.bn_running_stats({"bn_running_stats": "last_group"})


def _bn(running_var="biased", running_stats="mean_of_groups", cpu_kernel=True):
  bn = batch_norm.BatchNorm(
      C, running_var=running_var, running_stats=running_stats, cpu_kernel=cpu_kernel,
      momentum=MOMENTUM, epsilon=1e-5, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
  bn.mean[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)
  bn.train()
  return bn


def _x(tracklets, rows_per_tracklet=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tracklets * rows_per_tracklet, 3, 2, C)) * 2.0 + rng.normal(size=C)
  x[: rows_per_tracklet] += 3.0  # the first group differs from the others
  return x.astype(np.float32)


def _reference(bn, x, groups, running_var, running_stats):
  """NumPy float64: per-group normalisation and the running statistics' update."""
  x = x.astype(np.float64)
  scale, bias = np.asarray(bn.scale[...], np.float64), np.asarray(bn.bias[...], np.float64)
  rows = batch_norm.row_sizes(groups, x.shape[0])
  ys, means, vars_ = [], [], []
  start = 0
  for n in rows:
    part = x[start:start + n].reshape(-1, C)
    start += n
    mean, var = part.mean(0), part.var(0)
    ys.append(((part - mean) / np.sqrt(var + 1e-5) * scale + bias).reshape(
        (n,) + x.shape[1:-1] + (C,)))
    means.append(mean)
    vars_.append(var * part.shape[0] / (part.shape[0] - 1) if running_var == "unbiased" else var)
  if running_stats == "first_group":
    batch_mean, batch_var = means[0], vars_[0]
  else:
    batch_mean, batch_var = np.mean(means, 0), np.mean(vars_, 0)
  old_mean, old_var = np.asarray(bn.mean[...], np.float64), np.asarray(bn.var[...], np.float64)
  return (np.concatenate(ys), MOMENTUM * old_mean + (1 - MOMENTUM) * batch_mean,
          MOMENTUM * old_var + (1 - MOMENTUM) * batch_var)


@pytest.mark.parametrize("kernels", ["fast", "stock"])
@pytest.mark.parametrize("groups,running_var,running_stats",
                         [((2, 2, 2), "biased", "mean_of_groups"),
                          ((3, 3, 1), "unbiased", "first_group"),
                          ((4, 1), "unbiased", "mean_of_groups")])
def test_ghost_bn_equals_numpy_per_group(kernels, groups, running_var, running_stats):
  bn = _bn(running_var, running_stats)
  x = _x(sum(groups))
  y_ref, mean_ref, var_ref = _reference(bn, x, groups, running_var, running_stats)
  with resnet.kernels(kernels):
    y = bn(jnp.asarray(x), groups=groups)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(bn.mean[...]), mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(bn.var[...]), var_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_ghost_bn_equals_nnx_batchnorm_on_each_group(cpu_kernel):
  """Outputs = nnx.BatchNorm run on each group alone; "first_group" running statistics = those
  of the BN that saw the first group; "mean_of_groups" = the mean of the groups' BNs'."""
  groups = (3, 3, 2)
  x = jnp.asarray(_x(sum(groups), rows_per_tracklet=3))
  rows = batch_norm.row_sizes(groups, x.shape[0])
  ghost = {mode: _bn(running_stats=mode, cpu_kernel=cpu_kernel)
           for mode in batch_norm.RUNNING_STATS_MODES}
  outputs = {mode: bn(x, groups=groups) for mode, bn in ghost.items()}
  plain_y, plain_stats = [], []
  start = 0
  for n in rows:
    plain = nnx.BatchNorm(C, momentum=MOMENTUM, epsilon=1e-5, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(_bn()))
    plain.train()
    plain_y.append(plain(x[start:start + n]))
    plain_stats.append((plain.mean[...], plain.var[...]))
    start += n
  for mode, y in outputs.items():
    np.testing.assert_allclose(np.asarray(y), np.concatenate(plain_y), rtol=2e-5, atol=2e-5)
  first, mean_of = ghost["first_group"], ghost["mean_of_groups"]
  np.testing.assert_allclose(first.mean[...], plain_stats[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first.var[...], plain_stats[0][1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      mean_of.mean[...], np.mean([s[0] for s in plain_stats], 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      mean_of.var[...], np.mean([s[1] for s in plain_stats], 0), rtol=1e-5, atol=1e-6)


def test_one_group_is_the_whole_batch_path_exactly():
  x = jnp.asarray(_x(4))
  a, b = _bn(), _bn()
  np.testing.assert_array_equal(np.asarray(a(x, groups=(4,))), np.asarray(b(x)))
  np.testing.assert_array_equal(np.asarray(a.var[...]), np.asarray(b.var[...]))
  a.eval()
  np.testing.assert_array_equal(np.asarray(a(x, groups=(2, 2))), np.asarray(a(x)))


def _loss_and_grads(bn, x, cot, groups):
  graphdef, state = nnx.split(bn)

  def f(state, x):
    model = nnx.merge(graphdef, state, copy=True)
    y = model(x, groups=groups)
    return jnp.vdot(cot, y), nnx.state(model, nnx.BatchStat)

  (value, stats), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(state, x)
  return value, stats, grads


def test_rewrite_gradient_equals_autodiff():
  groups = (3, 3, 2)
  x = jnp.asarray(_x(sum(groups)))
  cot = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
  fast = _loss_and_grads(_bn(), x, cot, groups)
  with resnet.kernels("stock"):
    stock = _loss_and_grads(_bn(), x, cot, groups)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(stock)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [(2, 2, 2, 2), (3, 3, 2)])
def test_ghost_bn_under_a_sharded_batch(groups):
  """jit with the rows sharded over the 4-device `data` mesh = the unsharded computation
  (groups that do and do not line up with the devices' shards)."""
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 4
  x_np = _x(sum(groups), rows_per_tracklet=2)  # 16 rows: 4 per device
  cot = np.random.default_rng(3).normal(size=x_np.shape).astype(np.float32)
  bn = _bn("unbiased", "first_group")
  run = jax.jit(lambda x, cot: _loss_and_grads(bn, x, cot, groups))
  plain = run(jnp.asarray(x_np), jnp.asarray(cot))
  spec = NamedSharding(mesh, P("data"))
  sharded = run(jax.device_put(x_np, spec), jax.device_put(cot, spec))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  _, mean_ref, var_ref = _reference(bn, x_np, groups, "unbiased", "first_group")
  np.testing.assert_allclose(sharded[1]["mean"][...], mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded[1]["var"][...], var_ref, rtol=1e-5, atol=1e-6)


def test_ghost_rewrite_float32_close_to_float64():
  """The grouped rewrite keeps the whole-batch rewrite's precision (tree-reduced sums)."""
  groups = (2, 2, 1)
  rng = np.random.default_rng(0)
  x = (np.maximum(rng.standard_normal((5 * 2, 32, 32, 16)), 0.0) * 2.0 + 0.5)
  sizes = batch_norm.row_sizes(groups, x.shape[0])
  x3 = x.reshape(x.shape[0], -1, 16)
  ones, zeros = np.ones(16), np.zeros(16)
  _, mean32, var32 = batch_norm.ghost_batch_norm_train(
      jnp.asarray(x3, jnp.float32), jnp.asarray(ones, jnp.float32),
      jnp.asarray(zeros, jnp.float32), 1e-5, sizes)
  start = 0
  for g, n in enumerate(sizes):
    part = x3[start:start + n].reshape(-1, 16)
    start += n
    assert np.max(np.abs(np.asarray(mean32[g]) / part.mean(0) - 1)) < 4e-7
    assert np.max(np.abs(np.asarray(var32[g]) / part.var(0) - 1)) < 4e-7


def test_spread_loss_per_group_is_the_mean_of_group_losses():
  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(7, 2, 3, 5)) * 3.0), axis=-1)
  p = np.asarray(probs, np.float64)

  def direct(part):
    flat = part.reshape(-1, part.shape[-1])
    return np.mean(np.maximum(0.3 - (flat.max(0) - flat.min(0)), 0.0))

  # chunk_sizes(7, 3) = (3, 3, 1): the loss of each chunk, then the unweighted mean.
  expected = np.mean([direct(p[0:3]), direct(p[3:6]), direct(p[6:7])])
  np.testing.assert_allclose(float(losses.memory_spread_loss(probs, 0.3, groups=3)), expected,
                             rtol=1e-6)
  np.testing.assert_allclose(float(losses.memory_spread_loss(probs, 0.3, groups=1)), direct(p),
                             rtol=1e-6)
  assert abs(expected - direct(p)) > 1e-3  # the groups change the value
  temporal = probs[:, 0, 0]  # (B, N)
  expected_t = np.mean([direct(p[a:b, 0, 0]) for a, b in ((0, 3), (3, 6), (6, 7))])
  np.testing.assert_allclose(float(losses.memory_spread_loss(temporal, 0.3, 3)), expected_t,
                             rtol=1e-6)


def test_total_loss_spread_terms_follow_bn_groups():
  rng = np.random.default_rng(1)
  outputs = {
      "spatial_probs": jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 2, 4, 5)) * 3), -1),
      "temporal_probs": jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 3)) * 3), -1),
  }
  config = mars.get_config("stmn")
  config.model.bn_groups = 3
  _, terms = losses.total_loss(outputs, {"pid": jnp.zeros(6, jnp.int32)}, config)
  for name, key in (("spread_spatial", "spatial_probs"), ("spread_temporal", "temporal_probs")):
    np.testing.assert_allclose(
        float(terms[name]), float(losses.memory_spread_loss(outputs[key], 0.3, 3)), rtol=1e-6)


def _model_config(preset, groups, running_stats="mean_of_groups"):
  config = mars.get_config(f"{preset},smoke")  # depth 18, width 0.125, 64x32
  config.model.bn_groups = groups
  config.model.bn_running_stats = running_stats
  config.model.bn_running_var = "unbiased"
  if preset == "drsa":
    config.model.drsa.attention_bn = True
  return config


@nnx.jit
def _train_forward(model, frames):
  return model(frames), nnx.state(model, nnx.BatchStat)


def _per_group_runs(preset, frames, groups):
  """The model with whole-batch BN on each group alone: outputs and running statistics."""
  outs, stats = [], []
  start = 0
  for n in groups:
    model = models.create_model(_model_config(preset, 1), 5, nnx.Rngs(0))
    _perturb_heads(model)
    model.train()
    out, st = _train_forward(model, frames[start:start + n])
    outs.append(out)
    stats.append(st)
    start += n
  return outs, stats


def _perturb_heads(model):
  """Non-zero read-out BN scale (it starts at 0, which would hide its statistics)."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, batch_norm.BatchNorm) and not module.cpu_kernel:
      module.scale[...] = jnp.full(module.scale.shape, 0.7, jnp.float32)
      if module.bias is not None:
        module.bias[...] = jnp.full(module.bias.shape, 0.1, jnp.float32)


@pytest.mark.parametrize("preset", ["stmn", "sta", "drsa"])
def test_model_with_groups_equals_the_model_on_each_group(preset, fast_compiles):
  """Every BN of the model follows the groups: training-mode outputs of the whole batch with
  bn_groups = 3 equal the outputs of each group run alone (whole-batch BN), and the running
  statistics are those of the first group's run ("first_group") or their mean."""
  del fast_compiles
  config = _model_config(preset, 3, "first_group")
  b, length = 5, config.data.seq_len  # chunk_sizes(5, 3) = (2, 2, 1)
  groups = batch_norm.chunk_sizes(b, 3)
  frames = jnp.asarray(np.random.default_rng(0).normal(
      size=(b, length, config.data.height, config.data.width, 3)), jnp.float32)
  ghost = models.create_model(config, 5, nnx.Rngs(0))
  _perturb_heads(ghost)
  ghost.train()
  out, stats = _train_forward(ghost, frames)
  outs, group_stats = _per_group_runs(preset, frames, groups)
  for key in out:
    # Relative to the largest value: the groups' BNs over 2 rows (the sequence BNs) amplify the
    # float32 noise of their inputs by up to 1 / sqrt(eps); a BN that ignored the groups would
    # be off by the order of the values themselves.
    expected = np.concatenate([np.asarray(o[key]) for o in outs])
    error = np.max(np.abs(np.asarray(out[key]) - expected))
    assert error <= 2e-3 * np.max(np.abs(expected)), (key, error)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(group_stats[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  if preset == "stmn":  # the other mode once: the running statistics' mean over the groups
    mean_model = models.create_model(_model_config(preset, 3), 5, nnx.Rngs(0))
    _perturb_heads(mean_model)
    mean_model.train()
    _, mean_stats = _train_forward(mean_model, frames)
    expected = jax.tree.map(lambda *s: np.mean([np.asarray(v) for v in s], 0), *group_stats)
    for a, b in zip(jax.tree.leaves(mean_stats), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_eval_mode_ignores_groups_and_traces_a_symbolic_batch(fast_compiles):
  """In eval mode BatchNorm uses running statistics, which have no groups: a bn_groups = 3 model
  gives the bn_groups = 1 outputs, and traces with a free batch dimension (the SavedModel export's
  symbolic batch, which `chunk_sizes` cannot split)."""
  del fast_compiles
  config = _model_config("stmn", 3, "first_group")
  ghost = models.create_model(config, 5, nnx.Rngs(0))
  plain = models.create_model(_model_config("stmn", 1), 5, nnx.Rngs(0))
  assert batch_norm.in_training(ghost)
  ghost.eval()
  plain.eval()
  assert not batch_norm.in_training(ghost)
  shape = (4, config.data.seq_len, config.data.height, config.data.width, 3)
  frames = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  np.testing.assert_array_equal(np.asarray(ghost(frames)["embedding"]),
                                np.asarray(plain(frames)["embedding"]))
  graphdef, state = nnx.split(ghost)
  fn = lambda st, x: nnx.merge(graphdef, st)(x)["embedding"]
  (batch,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((batch, *shape[1:]), jnp.float32)
  exported = jax.export.export(jax.jit(fn))(state, spec)
  assert exported.out_avals[0].shape[0] == batch
