"""Float32 precision of the CPU BatchNorm rewrite (`resnet.batch_norm_train`) against float64.

A BN-heavy block, three ResNet-50 bottlenecks (width 0.25 layer1 shapes: 64 -> 16 -> 16 -> 64
channels, 9 BatchNorms) in training mode on (8, 64, 32, 64) post-ReLU-like inputs (16,384 rows
per channel), runs in float32 and, with the same float32 parameters and inputs, in float64
(`jax.enable_x64`). Compared: the batch statistics of every BN (momentum 0, so the running
statistics are the batch mean and biased variance) and the gradients of a random projection
of the output w.r.t. every parameter and the input (relative L2 errors).

Measured on XLA:CPU (2026-11-28), errors vs float64:

| float32 run | BN stats max | grads median | grads max | dx |
|---|---|---|---|---|
| rewrite, tree-reduced sums (now) | 9.7e-8 | 8.9e-7 | 1.8e-6 | 3.3e-7 |
| rewrite, one dot of ones per sum (before) | 4.4e-6 | 4.2e-4 | 2.9e-3 | 1.2e-3 |
| stock `nnx.BatchNorm` | 2.0e-7 | 5.3e-7 | 1.6e-6 | 3.4e-7 |

Bounds: about 3-4x today's figures, and at least 10x below the one-dot figures (the last test
checks that that version fails them), so the test catches a return of long sequential float32
accumulations, not rounding noise. The gradient median may also be at most 3x stock Flax's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmn_jax.models import cpu_kernels, resnet

SHAPE = (8, 64, 32, 64)  # N, H, W, C: 16,384 rows per BN channel
PLANES = 16
NUM_BLOCKS = 3
STATS_MAX = 4e-7
GRAD_MEDIAN = 3e-6
GRAD_MAX = 1e-5
DX_MAX = 1e-6


class _Stack(nnx.Module):
  """`NUM_BLOCKS` bottlenecks, (N, H, W, 64) -> (N, H, W, 64)."""

  def __init__(self, dtype):
    c = SHAPE[-1]
    self.blocks = nnx.List([
        resnet.Bottleneck(c, PLANES, 1, dtype=dtype, rngs=nnx.Rngs(i)) for i in range(NUM_BLOCKS)
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = block(x)
    return x


def _inputs() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal(SHAPE), 0.0) * 2.0 + 0.5  # post-ReLU-like, mean > 0
  cot = rng.standard_normal(SHAPE[:-1] + (4 * PLANES,))
  return x, cot


def _run(dtype, mode: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """BN batch statistics and gradients (params and `x`) of `sum(cot * stack(x))`, as float64."""
  stack = _Stack(dtype)
  for _, module in nnx.iter_modules(stack):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 0.0  # running statistics = this batch's statistics
  stack.train()
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
  x_np, cot_np = _inputs()
  x, cot = jnp.asarray(x_np, dtype), jnp.asarray(cot_np, dtype)

  def f(params, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return jnp.vdot(cot, model(x)), nnx.state(model, nnx.BatchStat)

  with resnet.kernels(mode):
    (_, stats), (grads, dx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        params, x)

  def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  return flat(stats), {**flat(grads), "x": np.asarray(dx, np.float64)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _errors(mode: str, reference) -> dict[str, float]:
  ref_stats, ref_grads = reference
  stats, grads = _run(jnp.float32, mode)
  assert stats.keys() == ref_stats.keys() and grads.keys() == ref_grads.keys()
  assert len(stats) == 2 * 3 * NUM_BLOCKS  # mean and var of every BN
  e_stats = [_rel(stats[k], ref_stats[k]) for k in stats]
  e_grads = [_rel(grads[k], ref_grads[k]) for k in grads]
  return dict(stats_max=max(e_stats), grad_median=float(np.median(e_grads)),
              grad_max=max(e_grads), dx=_rel(grads["x"], ref_grads["x"]))


@pytest.fixture(scope="module")
def reference():
  """The float64 run of the same code (same float32 parameter values and inputs)."""
  with jax.enable_x64(True):
    return _run(jnp.float64, "fast")


def test_rewrite_float32_close_to_float64(reference):
  fast = _errors("fast", reference)
  assert fast["stats_max"] <= STATS_MAX, fast
  assert fast["grad_median"] <= GRAD_MEDIAN, fast
  assert fast["grad_max"] <= GRAD_MAX, fast
  assert fast["dx"] <= DX_MAX, fast
  stock = _errors("stock", reference)
  assert fast["grad_median"] <= 3 * stock["grad_median"], (fast, stock)


def test_float64_reference_is_the_stock_function(reference):
  """The reference itself: the rewrite in float64 equals stock Flax BN in float64."""
  with jax.enable_x64(True):
    stock_stats, stock_grads = _run(jnp.float64, "stock")
  ref_stats, ref_grads = reference
  for k in ref_stats:
    assert _rel(stock_stats[k], ref_stats[k]) < 1e-10, k
  for k in ref_grads:
    assert _rel(stock_grads[k], ref_grads[k]) < 1e-6, k  # float32 params: float32 cotangents


def _ones_dot_sum(x: jax.Array) -> jax.Array:
  """The former `_column_sum`: one float32 matrix-vector product with a vector of ones."""
  return jnp.dot(jnp.ones((x.shape[0],), x.dtype), x, precision=jax.lax.Precision.HIGHEST)


def test_bounds_reject_sequential_accumulation(reference, monkeypatch):
  """The bounds are tight enough to fail the one-dot column sums this test was written for."""
  monkeypatch.setattr(cpu_kernels, "_column_sum", _ones_dot_sum)
  old = _errors("fast", reference)
  assert old["stats_max"] > 5 * STATS_MAX, old
  assert old["grad_median"] > 10 * GRAD_MEDIAN, old
  assert old["dx"] > 10 * DX_MAX, old
