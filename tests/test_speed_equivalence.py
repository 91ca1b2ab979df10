"""The CPU speed rewrites of `stmn_jax/models/resnet.py` against the stock ops they replace.

`resnet.kernels("fast")` (BatchNorm training statistics in two passes and a closed-form
gradient, `batch_norm_train`; max-pool as 9 strided slices, `max_pool_slices`) must compute
the same function as `resnet.kernels("stock")` (`nnx.BatchNorm`, `nnx.max_pool`). Checked:
outputs, BN running statistics and gradients, in float32 and float64 (`jax.enable_x64`), train
and eval mode, odd spatial sizes and ties for the max-pool, and a whole ResNet-18 trunk + layer4
(stride-2 blocks, downsample shortcuts) at 32x16 in train mode.

Tolerances: float64 1e-10 relative to the largest magnitude of the compared array (gradients
of the float32 parameters: 2 float32 epsilons); float32 2e-5 for values and 2e-4 for gradients
(summation order differs; x10 through the 20 BN layers of the ResNet). Where float32 rounding
matters (BN inputs with a large mean: E[x^2] - E[x]^2 cancels), both float32 versions are
compared with the float64 result and the rewrite may not be more than 2x further from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmn_jax.models import resnet

pytestmark = pytest.mark.usefixtures("fast_compiles")

TOL = {jnp.float32: (2e-5, 2e-4), jnp.float64: (1e-10, 1e-10)}  # (values, gradients)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _bn_run(mode: str, x: jax.Array, dtype, cot: jax.Array, train: bool = True,
            running_var: str = "biased"):
  """One BN layer (random scale/bias/running stats) under `mode`: output, running stats after
  the call, and gradients of sum(cot * relu(y)) w.r.t. x, scale, bias."""
  c = x.shape[-1]
  bn = resnet.batch_norm(c, dtype, nnx.Rngs(0), running_var=running_var)
  rng = np.random.default_rng(1)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  bn.mean[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
  bn.train() if train else bn.eval()
  graphdef, state = nnx.split(bn)

  def f(state, x):
    layer = nnx.merge(graphdef, state)
    y = layer(x)
    return jnp.sum(cot * jax.nn.relu(y)), (y, nnx.state(layer, nnx.BatchStat))

  with resnet.kernels(mode):
    (_, (y, stats)), (gs, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        state, x)
  params = nnx.state(gs, nnx.Param)
  return dict(y=y, mean=stats["mean"][...], var=stats["var"][...], dx=gx,
              mean0=state["mean"][...],
              dscale=params["scale"][...], dbias=params["bias"][...])


def _bn_inputs(shape, dtype, offset=0.0, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = (jax.random.normal(k1, shape, dtype) * 1.5 + offset)
  return x, jax.random.normal(k2, shape, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_matches_stock(dtype, train):
  with jax.enable_x64(dtype == jnp.float64):
    x, cot = _bn_inputs((3, 5, 7, 24), dtype)  # odd spatial sizes: 105 rows per channel
    stock = _bn_run("stock", x, dtype, cot, train)
    fast = _bn_run("fast", x, dtype, cot, train)
  val_tol, grad_tol = TOL[dtype]
  for key in ("y", "mean", "var"):
    assert _rel_err(fast[key], stock[key]) <= val_tol, key
  for key in ("dx", "dscale", "dbias"):
    assert _rel_err(fast[key], stock[key]) <= grad_tol, key
  if train:  # the running statistics moved: the update really ran in both
    assert not np.allclose(stock["mean"], stock["mean0"])


def test_batch_norm_float32_accuracy_with_large_mean():
  """Inputs with mean 8x their spread (where E[x^2] - E[x]^2 loses digits in float32): the
  rewrite is no further from float64 than 2x stock float32's error (both ~1e-6..1e-4)."""
  with jax.enable_x64(True):
    x64, cot64 = _bn_inputs((4, 9, 5, 32), jnp.float64, offset=12.0, seed=3)
    ref = _bn_run("stock", x64, jnp.float64, cot64)
    x32, cot32 = x64.astype(jnp.float32), cot64.astype(jnp.float32)
  stock = _bn_run("stock", x32, jnp.float32, cot32)
  fast = _bn_run("fast", x32, jnp.float32, cot32)
  for key in ("y", "var", "dx", "dscale", "dbias"):
    e_stock, e_fast = _rel_err(stock[key], ref[key]), _rel_err(fast[key], ref[key])
    assert e_fast <= max(2 * e_stock, 1e-6), (key, e_fast, e_stock)
    assert e_fast < 1e-2, (key, e_fast)


def test_batch_norm_running_statistics_formula():
  """Direct check of the running-statistics update (Flax momentum 0.9, biased variance)."""
  x, cot = _bn_inputs((2, 3, 3, 8), jnp.float32, offset=1.0)
  fast = _bn_run("fast", x, jnp.float32, cot)
  before = _bn_run("fast", x, jnp.float32, cot, train=False)  # eval: stats unchanged
  np.testing.assert_array_equal(before["mean"], before["mean0"])
  xs = np.asarray(x, np.float64).reshape(-1, 8)
  want_mean = 0.9 * np.asarray(fast["mean0"]) + 0.1 * xs.mean(0)
  want_var = 0.9 * np.asarray(before["var"]) + 0.1 * xs.var(0)
  np.testing.assert_allclose(fast["mean"], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fast["var"], want_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["fast", "stock"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_unbiased_running_variance(mode, dtype):
  """`running_var="unbiased"` (PyTorch's / the official code's): after one training step the
  running variance is 0.9 old + 0.1 * var_biased * n / (n - 1), n = rows per channel; the
  output, the running mean and the gradients are those of the biased default."""
  x, cot = _bn_inputs((2, 3, 3, 8), jnp.float32, offset=1.0)  # n = 18: factor 18 / 17
  biased = _bn_run(mode, x, dtype, cot)
  unbiased = _bn_run(mode, x, dtype, cot, running_var="unbiased")
  xs = np.asarray(x.astype(dtype), np.float64).reshape(-1, 8)
  n = xs.shape[0]
  var0 = np.asarray(_bn_run(mode, x, dtype, cot, train=False)["var"])  # before the step
  want = 0.9 * var0 + 0.1 * xs.var(0) * n / (n - 1)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(unbiased["var"], want, rtol=tol, atol=tol)
  assert not np.allclose(unbiased["var"], biased["var"], rtol=1e-4, atol=0)
  for key in ("y", "mean", "dx", "dscale", "dbias"):
    np.testing.assert_array_equal(unbiased[key], biased[key], err_msg=key)
  with pytest.raises(ValueError, match="running_var"):
    resnet.batch_norm(8, jnp.float32, nnx.Rngs(0), running_var="pytorch")


def test_batch_norm_bfloat16_compute_is_stock():
  """16-bit compute dtypes keep the stock BN (the rewrite is for float32 / float64)."""
  x, cot = _bn_inputs((2, 4, 4, 16), jnp.float32)
  stock = _bn_run("stock", x, jnp.bfloat16, cot)
  fast = _bn_run("fast", x, jnp.bfloat16, cot)
  assert fast["y"].dtype == stock["y"].dtype == jnp.bfloat16
  for key in ("y", "mean", "var", "dx", "dscale", "dbias"):
    np.testing.assert_array_equal(fast[key], stock[key], err_msg=key)


def _pool_and_grad(mode: str, x: jax.Array, cot: jax.Array):
  def f(x):
    y = resnet.max_pool_3x3_s2(x)
    return jnp.sum(cot * y), y
  with resnet.kernels(mode):
    g, y = jax.jit(jax.grad(f, has_aux=True))(x)
  return y, g


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("hw", [(9, 7), (8, 6), (1, 1)])
def test_max_pool_matches_stock(dtype, hw):
  with jax.enable_x64(dtype == jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(hw[0]))
    x = jax.random.normal(k1, (2, *hw, 3), dtype)
    x = jnp.concatenate([x, jnp.round(x), jax.nn.relu(x)])  # continuous, integer ties, zeros
    ho, wo = (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1
    cot = jax.random.normal(k2, (6, ho, wo, 3), dtype)
    ys, gs = _pool_and_grad("stock", x, cot)
    yf, gf = _pool_and_grad("fast", x, cot)
  assert yf.shape == ys.shape == (6, ho, wo, 3)
  np.testing.assert_array_equal(yf, ys)  # a max is exact
  # Ties: each window's gradient goes to the same (first) maximum; only the order of the adds
  # where windows overlap differs.
  assert _rel_err(gf, gs) <= TOL[dtype][1]


def test_max_pool_brute_force():
  x = np.random.default_rng(0).normal(size=(1, 7, 6, 2)).astype(np.float32)
  pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  want = np.array([[[pad[0, 2 * a:2 * a + 3, 2 * b:2 * b + 3, c].max() for c in range(2)]
                    for b in range(3)] for a in range(4)])
  with resnet.kernels("fast"):
    got = resnet.max_pool_3x3_s2(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got)[0], want)


def _resnet_run(mode: str, dtype):
  """ResNet-18 (width 0.125) trunk + stride-2 layer4 at 32x16, train mode: output, BN stats
  and parameter gradients."""
  trunk = resnet.ResNetTrunk(18, 0.125, stem_relu=True, dtype=dtype, rngs=nnx.Rngs(0))
  stage = resnet.ResNetStage(18, 0.125, stride=2, final_relu=False, dtype=dtype,
                             rngs=nnx.Rngs(1))
  net = nnx.List([trunk, stage])
  net.train()
  graphdef, state = nnx.split(net)
  x = jax.random.normal(jax.random.key(5), (4, 32, 16, 3), dtype)

  def f(state):
    trunk, stage = nnx.merge(graphdef, state)
    y = stage(trunk(x))
    return jnp.sum(jnp.sin(3.0 * y)), (y, nnx.state((trunk, stage)))

  with resnet.kernels(mode):
    (_, (y, new_state)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
  return y, nnx.state(new_state, nnx.BatchStat), nnx.state(grads, nnx.Param)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_resnet18_stack_matches_stock(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    ys, stats_s, grads_s = _resnet_run("stock", dtype)
    yf, stats_f, grads_f = _resnet_run("fast", dtype)
  val_tol, grad_tol = TOL[dtype]
  # Parameters are float32 in both modes, so float64 gradients end rounded to float32.
  grad_tol = max(grad_tol, 2 * float(jnp.finfo(jnp.float32).eps))
  # Float32 through 20 BN layers in train mode: allow the per-layer tolerance a few times over.
  scale = 10 if dtype == jnp.float32 else 1
  assert yf.shape == ys.shape == (4, 1, 1, 64)
  assert _rel_err(yf, ys) <= scale * val_tol
  flat_s, flat_f = dict(nnx.to_flat_state(stats_s)), dict(nnx.to_flat_state(stats_f))
  # 20 BN layers: stem, 4 in layer1, 5 in each of layer2, layer3, layer4 (with downsample).
  assert flat_s.keys() == flat_f.keys() and len(flat_s) == 2 * 20
  for k in flat_s:
    assert _rel_err(flat_f[k][...], flat_s[k][...]) <= scale * val_tol, k
  gs, gf = dict(nnx.to_flat_state(grads_s)), dict(nnx.to_flat_state(grads_f))
  assert gs.keys() == gf.keys() and len(gs) == 20 * 2 + 20  # BN scale/bias + 20 convs
  for k in gs:
    assert _rel_err(gf[k][...], gs[k][...]) <= scale * grad_tol, k
  assert max(float(np.max(np.abs(v[...]))) for v in gs.values()) > 0  # gradients are not all 0


def test_kernel_choice():
  assert resnet.use_fast_kernels() == (jax.default_backend() == "cpu")  # "auto"
  with resnet.kernels("stock"):
    assert not resnet.use_fast_kernels()
    with resnet.kernels("fast"):
      assert resnet.use_fast_kernels()
    assert not resnet.use_fast_kernels()
  with pytest.raises(ValueError, match="kernels must be one of"):
    resnet.set_kernels("onednn")
  # Same variables as stock nnx.BatchNorm (checkpoints / torchvision weights keep loading).
  ours = nnx.state(resnet.batch_norm(8, jnp.float32, nnx.Rngs(0)))
  stock = nnx.state(nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
  assert jax.tree.structure(jax.tree.map(jnp.shape, ours)) == jax.tree.structure(
      jax.tree.map(jnp.shape, stock))
