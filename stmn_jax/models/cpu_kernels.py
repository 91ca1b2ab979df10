"""XLA:CPU rewrites of two ResNet ops, and the switch that picks them at trace time.

"auto" (the default) uses them when the default backend is the CPU at trace time, the stock
Flax / XLA ops elsewhere; "fast" / "stock" force one (`set_kernels`, `kernels`). Both compute
the same function (tests/test_speed_equivalence.py); only the speed differs:
- `batch_norm_train`: BatchNorm's training statistics in two passes (tree-reduced column sums)
  with a closed-form gradient;
- `max_pool_slices`: a 3x3 / stride 2 max-pool as the max of 9 strided slices, with a
  hand-written first-maximum gradient.
`models/resnet.py` calls them; they hold no parameters.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import jax
import jax.numpy as jnp


# ------------------------------------------------------------------------------ kernel choice
KERNEL_MODES = ("auto", "fast", "stock")
_kernels = "auto"


def set_kernels(mode: str) -> None:
  """Sets the process-wide kernel choice ("auto" | "fast" | "stock"), read at trace time.

  A function already jitted keeps the kernels it was traced with.
  """
  global _kernels
  if mode not in KERNEL_MODES:
    raise ValueError(f"resnet kernels must be one of {KERNEL_MODES}, got {mode!r}")
  _kernels = mode


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
  """`with kernels("stock"): ...` traces the enclosed calls with that choice."""
  old = _kernels
  set_kernels(mode)
  try:
    yield
  finally:
    set_kernels(old)


def use_fast_kernels() -> bool:
  """True when the CPU rewrites are used for code traced now."""
  if _kernels == "auto":
    return jax.default_backend() == "cpu"
  return _kernels == "fast"


def _column_sum(x: jax.Array) -> jax.Array:
  """`(M, C) -> (C,)` sum over rows, as a reduction (`jnp.sum(x, axis=0)`).

  XLA:CPU splits a long reduction into a tree (partial sums of short windows, then their sum),
  so each float32 accumulation runs over few terms. The earlier matrix-vector product with a
  vector of ones accumulated each column almost sequentially over all M rows: on a
  (24, 64, 128, 64) tensor its batch mean was 4e-6..8e-6 relative off float64 and the two-pass
  variance up to 8e-4; the reduction gives 6e-8..7e-8 and 6e-8 (PyTorch's BN mean: 3.9e-8), and
  the ResNet train step is no slower (0.97-0.98x the product's on 2 cores; a product over
  blocks of M^(1/3) rows, 1.2e-7, was 1.02x). See tests/test_bn_precision.py.
  """
  return jnp.sum(x, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm of `x (M, C)` over its rows -> `(y (M, C), mean (C,), var (C,))`.

  The same function as `nnx.BatchNorm` with batch statistics (biased variance), computed in
  two passes (mean, then the mean of squared deviations; Flax's one-pass E[x^2] - E[x]^2
  loses digits in float32 when |mean| >> std), each column sum a tree reduction
  (`_column_sum`); the gradient is the closed form
  `dx = scale / sigma * (dy - mean(dy) - xhat * mean(dy * xhat))` with its sums as
  `_column_sum` too (plus the terms of `mean` and `var` when their cotangents are used).
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  m = x.shape[0]
  mean = _column_sum(x) / m
  centered = x - mean
  var = _column_sum(centered * centered) / m  # two passes: no E[x^2] - E[x]^2 cancellation
  inv = jax.lax.rsqrt(var + epsilon)
  y = centered * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  dy, dmean, dvar = cotangents
  m = x.shape[0]
  centered = x - mean
  xhat = centered * inv
  sum_dy = _column_sum(dy)
  sum_dy_xhat = _column_sum(dy * xhat)
  dx = (scale * inv) * (dy - sum_dy / m - xhat * (sum_dy_xhat / m))
  dx = dx + dmean / m + centered * (2.0 * dvar / m)
  return dx, sum_dy_xhat, sum_dy


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _pool_windows(x: jax.Array) -> list[jax.Array]:
  """The 9 strided views of a 3x3 / stride 2 / pad 1 window (-inf padding), row-major order:
  view `3 i + j` holds `x[2a + i - 1, 2b + j - 1]` at output `(a, b)`."""
  _, h, w, _ = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 2 * ho - h), (1, 2 * wo - w), (0, 0)),
               constant_values=-jnp.inf)
  return [xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2, :] for i in range(3) for j in range(3)]


@jax.custom_vjp
def max_pool_slices(x: jax.Array) -> jax.Array:
  """`max_pool_3x3_s2` as the max of 9 strided slices, `(N, H, W, C) -> (N, Ho, Wo, C)`.

  The gradient goes to the first maximum of each window in row-major order, as XLA's
  `select_and_scatter` (the stock gradient) does, so ties give identical gradients; it is
  built from 9 selects and interior-padded adds instead of `select_and_scatter` (slow on CPU).
  """
  views = _pool_windows(x)
  y = views[0]
  for v in views[1:]:
    y = jnp.maximum(y, v)
  return y


def _max_pool_slices_fwd(x):
  y = max_pool_slices(x)
  return y, (x, y)


def _max_pool_slices_bwd(residuals, g):
  x, y = residuals
  _, h, w, _ = x.shape
  ho, wo = y.shape[1], y.shape[2]
  taken = jnp.zeros(y.shape, bool)
  zero = jnp.zeros((), g.dtype)
  dxp = None
  for k, v in enumerate(_pool_windows(x)):
    i, j = divmod(k, 3)
    hit = (v == y) & ~taken
    taken = taken | hit
    # Output (a, b) of view k reads padded position (2a + i, 2b + j) of (2 ho + 1, 2 wo + 1).
    part = jax.lax.pad(jnp.where(hit, g, zero), zero,
                       ((0, 0, 0), (i, 2 - i, 1), (j, 2 - j, 1), (0, 0, 0)))
    dxp = part if dxp is None else dxp + part
  return (dxp[:, 1:1 + h, 1:1 + w, :],)


max_pool_slices.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)
