"""BatchNorm for every model: the XLA:CPU rewrite, PyTorch's running variance, ghost BatchNorm.

`BatchNorm` is an `nnx.BatchNorm` (the same variables: scale, bias, mean, var; the same random
numbers at construction) with three additions:
- `cpu_kernel=True` (the backbone's BNs): training mode on XLA:CPU (`cpu_kernels.use_fast_kernels`)
  runs the rewrite `cpu_kernels.batch_norm_train` (the same function, tree-reduced sums, a
  closed-form gradient). The heads' BNs pass `cpu_kernel=False` and keep the stock Flax code, so
  with the default fields their numbers are exactly those of a plain `nnx.BatchNorm`.
- `running_var` (`config.model.bn_running_var`): "biased" (Flax's; default, the paper does not
  say) or "unbiased" (PyTorch's, hence the official code's): the running variance moves towards
  the batch variance times n / (n - 1), n = rows per channel (per group with ghost BN).
  Normalisation always uses the biased variance, as both frameworks do.
- ghost BatchNorm: `bn(x, groups=(11, 11, 10))` normalises each group of tracklets with its own
  batch statistics (`config.model.bn_groups`; below).

Ghost BatchNorm (issue 15, item 3). The official run wraps the model in `nn.DataParallel` on 3
GPUs: each batch of B tracklets is cut along its first axis with `torch.chunk` semantics
(`chunk_sizes`: chunks of ceil(B / G) tracklets, the last one smaller, and fewer than G chunks
when ceil(B / G) divides B in fewer pieces, e.g. B = 4, G = 3 -> 2, 2), and every BN of every
replica normalises with the statistics of its own chunk. `groups` is that partition: tracklet
counts that sum to B. A BN input's first axis holds B * r rows, tracklet-major (r = L frames for
the backbone, the memory read-out and the frame BNNeck; r = 1 for the sequence BNNeck), so
group k is a run of groups[k] * r consecutive rows (`row_sizes`); its statistics are taken over
those rows and every other axis but the channels. The sums over a group use a constant one-hot
(rows, G) matrix as a broadcast product followed by tree-reduced sums (no matrix product, so no
dependence on a backend's float32 matmul precision): plain jnp ops that XLA SPMD partitions
correctly when the first axis is sharded over the mesh's `data` axis, for any group sizes and any
number of devices. The groups belong to the global batch, so 1, 3 or 8 devices give the same
numbers. `groups=None` or a single group is the whole-batch code path, unchanged.

Running statistics with G > 1 groups (`running_stats`, `config.model.bn_running_stats`):
- "mean_of_groups" (default): the running mean and variance move towards the unweighted mean
  over the groups of their batch means and (biased or unbiased) variances. The paper has no
  groups; once groups are asked for, the network normalises with group statistics, and their
  mean over the groups estimates what one group sees from every row of the batch (G times the
  data of one group, and independent of which tracklets land in the first group).
- "first_group" (official): the first group's statistics only. Under `nn.DataParallel` replica
  0's BN buffers are the module's own tensors (torch's `broadcast_coalesced` returns the source
  tensors for the first device), so F.batch_norm updates them in place from the first chunk,
  while the other replicas update copies that are thrown away.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmn_jax.models.cpu_kernels import batch_norm_train, use_fast_kernels

RUNNING_VAR_MODES = ("biased", "unbiased")
RUNNING_STATS_MODES = ("mean_of_groups", "first_group")

Groups = tuple[int, ...]


# ------------------------------------------------------------------------------ groups
def chunk_sizes(batch: int, groups: int) -> Groups:
  """`torch.chunk(x, groups)` sizes along an axis of `batch` items: ceil(batch / groups) each,
  the last one what is left, so there may be fewer than `groups` chunks (32, 3 -> 11, 11, 10;
  4, 3 -> 2, 2; 5, 4 -> 2, 2, 1)."""
  if batch < 1 or groups < 1:
    raise ValueError(f"chunk_sizes: batch and groups must be >= 1, got {batch} and {groups}")
  size = -(-batch // groups)
  return tuple(min(size, batch - start) for start in range(0, batch, size))


def tracklet_groups(batch: int, groups: int, training: bool = True) -> Groups | None:
  """The ghost-BN groups of `batch` tracklets split into `groups` (`chunk_sizes`); None when that
  is one group (the whole-batch code path) or in eval mode (`training=False`: running statistics
  have no groups). Neither case looks at the batch, which may be symbolic (the SavedModel export
  traces a free batch dimension)."""
  if groups == 1 or not training:
    return None
  sizes = chunk_sizes(batch, groups)
  return sizes if len(sizes) > 1 else None


def in_training(module: nnx.Module) -> bool:
  """Whether `module`'s BatchNorms use batch statistics (the first BatchNorm found; `model.train()`
  / `model.eval()` set them all); True when it has none."""
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.BatchNorm):
      return not node.use_running_average
  return True


def row_sizes(groups: Sequence[int], rows: int) -> Groups:
  """Tracklets per group -> rows per group of a first axis of `rows` = B * r tracklet-major
  rows (r rows per tracklet)."""
  batch = sum(groups)
  if rows % batch:
    raise ValueError(
        f"ghost BatchNorm: the first axis ({rows} rows) is not a multiple of the {batch} "
        f"tracklets of the groups {tuple(groups)}")
  return tuple(g * (rows // batch) for g in groups)


def _one_hot(sizes: Groups, dtype) -> jax.Array:
  """(rows, G) constant: row i belongs to group g."""
  ids = np.repeat(np.arange(len(sizes)), sizes)
  return jnp.asarray(ids[:, None] == np.arange(len(sizes))[None, :], dtype)


def group_sum(x3: jax.Array, one_hot: jax.Array) -> jax.Array:
  """(N, R, C) -> (G, C): sums over the R axis, then over the rows of each group."""
  return jnp.sum(jnp.sum(x3, axis=1)[:, None, :] * one_hot[:, :, None], axis=0)


def to_rows(stat: jax.Array, one_hot: jax.Array) -> jax.Array:
  """(G, C) per-group values -> (N, 1, C), each row its group's (exact: one non-zero term)."""
  return jnp.sum(one_hot[:, :, None] * stat[None, :, :], axis=1)[:, None, :]


def _counts(sizes: Groups, per_row: int, dtype) -> jax.Array:
  return jnp.asarray([[s * per_row] for s in sizes], dtype)  # (G, 1)


def ghost_batch_norm(x3: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     sizes: Groups) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BN of x3 (N, R, C) per group of rows (`sizes`, summing to N) ->
  (y (N, R, C), mean (G, C), biased var (G, C)); two-pass variance; differentiable by autodiff.
  """
  one_hot = _one_hot(sizes, x3.dtype)
  counts = _counts(sizes, x3.shape[1], x3.dtype)
  mean = group_sum(x3, one_hot) / counts
  centered = x3 - to_rows(mean, one_hot)
  var = group_sum(centered * centered, one_hot) / counts
  inv = jax.lax.rsqrt(var + epsilon)
  return centered * (to_rows(inv, one_hot) * scale) + bias, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ghost_batch_norm_train(x3: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                           sizes: Groups) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`ghost_batch_norm` with the closed-form gradient of `cpu_kernels.batch_norm_train`, applied
  per group (the XLA:CPU path): dx = scale / sigma_g * (dy - mean_g(dy) - xhat mean_g(dy xhat))."""
  return ghost_batch_norm(x3, scale, bias, epsilon, sizes)


def _ghost_fwd(x3, scale, bias, epsilon, sizes):
  y, mean, var = ghost_batch_norm(x3, scale, bias, epsilon, sizes)
  return (y, mean, var), (x3, mean, jax.lax.rsqrt(var + epsilon), scale)


def _ghost_bwd(epsilon, sizes, residuals, cotangents):
  del epsilon
  x3, mean, inv, scale = residuals
  dy, dmean, dvar = cotangents
  one_hot = _one_hot(sizes, x3.dtype)
  counts = _counts(sizes, x3.shape[1], x3.dtype)
  centered = x3 - to_rows(mean, one_hot)
  inv_rows = to_rows(inv, one_hot)
  xhat = centered * inv_rows
  sum_dy = group_sum(dy, one_hot)
  sum_dy_xhat = group_sum(dy * xhat, one_hot)
  dx = (scale * inv_rows) * (
      dy - to_rows(sum_dy / counts, one_hot) - xhat * to_rows(sum_dy_xhat / counts, one_hot))
  dx = dx + to_rows(dmean / counts, one_hot) + centered * to_rows(2.0 * dvar / counts, one_hot)
  return dx, jnp.sum(sum_dy_xhat, axis=0), jnp.sum(sum_dy, axis=0)


ghost_batch_norm_train.defvjp(_ghost_fwd, _ghost_bwd)


# ------------------------------------------------------------------------------ the module
class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` with `running_var`, `running_stats`, `cpu_kernel` (module docstring) and
  ghost BN: `bn(x, groups=...)` in training mode, `groups` = tracklets per group (None: the
  whole batch). Only the layout used here is taken over (statistics over every axis but the
  last, no mask, no cross-device axis name: SPMD jit shards the sums itself); anything else
  runs the stock code.
  """

  def __init__(self, *args, running_var: str = "biased", running_stats: str = "mean_of_groups",
               cpu_kernel: bool = True, **kwargs):
    if running_var not in RUNNING_VAR_MODES:
      raise ValueError(
          f"BatchNorm running_var must be one of {RUNNING_VAR_MODES}, got {running_var!r}")
    if running_stats not in RUNNING_STATS_MODES:
      raise ValueError(
          f"BatchNorm running_stats must be one of {RUNNING_STATS_MODES}, got {running_stats!r}")
    super().__init__(*args, **kwargs)
    self.running_var = running_var
    self.running_stats = running_stats
    self.cpu_kernel = cpu_kernel

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None,
               groups: Sequence[int] | None = None):
    use_running_average = (self.use_running_average if use_running_average is None
                           else use_running_average)
    if use_running_average or groups is None or len(groups) < 2:
      return self._whole_batch(x, use_running_average, mask)
    return self._ghost(x, tuple(int(g) for g in groups), mask)

  def _fast(self, x) -> tuple[bool, Any]:
    compute = jnp.dtype(self.dtype if self.dtype is not None else x.dtype)
    # bf16 / f16 compute keeps the stock code: its gradient norm stayed closer to float32's
    # (tests/test_mixed_precision.py) than the rewrite's.
    return self.cpu_kernel and compute.itemsize >= 4 and use_fast_kernels(), compute

  def _whole_batch(self, x, use_running_average, mask):
    fast, compute = self._fast(x)
    if (use_running_average or mask is not None or self.axis_name is not None
        or self.axis not in (-1, x.ndim - 1) or not fast):
      if use_running_average or self.running_var == "biased":
        return super().__call__(x, use_running_average, mask=mask)
      if mask is not None or self.axis_name is not None:
        raise NotImplementedError("BatchNorm running_var='unbiased' with a mask or axis_name")
      old_var = self.var[...]
      y = super().__call__(x, use_running_average, mask=mask)
      # stock: new = m old + (1 - m) v  ->  m old + (1 - m) v n / (n - 1)
      n = x.size // x.shape[self.axis]
      moved = self.var[...] - self.momentum * old_var
      self.var[...] = self.var[...] + moved / max(n - 1, 1)
      return y
    scale, bias = self.promote_dtype((self.scale[...], self.bias[...]), dtype=self.dtype)
    x = jnp.asarray(x, self.dtype) if self.dtype is not None else x
    stats = jnp.promote_types(x.dtype, jnp.float32)  # statistics at least float32, as Flax
    c = x.shape[-1]
    y, mean, var = batch_norm_train(
        x.reshape(-1, c).astype(stats), scale.astype(stats), bias.astype(stats), self.epsilon)
    rows = x.size // c
    self._update(mean, var * (rows / max(rows - 1, 1)) if self.running_var == "unbiased" else var)
    return y.reshape(x.shape).astype(x.dtype)

  def _ghost(self, x, groups: Groups, mask):
    if mask is not None or self.axis_name is not None or self.axis not in (-1, x.ndim - 1):
      raise NotImplementedError(
          "ghost BatchNorm (groups) supports statistics over every axis but the last, without a "
          "mask or axis_name")
    fast, compute = self._fast(x)
    stats = jnp.promote_types(compute, jnp.float32)
    n, c = x.shape[0], x.shape[-1]
    sizes = row_sizes(groups, n)
    x3 = jnp.asarray(x, compute).reshape(n, -1, c).astype(stats)
    scale = self.scale[...] if self.scale is not None else jnp.ones((c,), stats)
    bias = self.bias[...] if self.bias is not None else jnp.zeros((c,), stats)
    kernel = ghost_batch_norm_train if fast else ghost_batch_norm
    y, mean, var = kernel(x3, scale.astype(stats), bias.astype(stats), self.epsilon, sizes)
    if self.running_var == "unbiased":
      counts = np.asarray([[s * x3.shape[1]] for s in sizes], np.float64)
      var = var * jnp.asarray(counts / np.maximum(counts - 1, 1), var.dtype)
    if self.running_stats == "first_group":
      self._update(mean[0], var[0])
    else:
      self._update(jnp.mean(mean, axis=0), jnp.mean(var, axis=0))
    return y.reshape(x.shape).astype(compute)

  def _update(self, mean: jax.Array, var: jax.Array) -> None:
    """Running statistics: new = momentum * old + (1 - momentum) * batch (no gradient)."""
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(
        (m * self.mean[...] + (1 - m) * mean).astype(self.mean.dtype))
    self.var[...] = jax.lax.stop_gradient(
        (m * self.var[...] + (1 - m) * var).astype(self.var.dtype))


# ------------------------------------------------------------------------------ from a config
def _choice(config_model: Any, name: str, default: str, choices: Sequence[str]) -> str:
  value = config_model.get(name, default)
  if value not in choices:
    raise ValueError(f"config.model.{name} must be one of {tuple(choices)}, got {value!r}")
  return value


def bn_running_var(config_model: Any) -> str:
  """`config.model.bn_running_var` ("biased" when absent); ValueError if unknown."""
  return _choice(config_model, "bn_running_var", "biased", RUNNING_VAR_MODES)


def bn_running_stats(config_model: Any) -> str:
  """`config.model.bn_running_stats` ("mean_of_groups" when absent); ValueError if unknown."""
  return _choice(config_model, "bn_running_stats", "mean_of_groups", RUNNING_STATS_MODES)


def bn_groups(config_model: Any) -> int:
  """`config.model.bn_groups` (1 when absent): BN groups in the global batch; ValueError if not
  a positive integer."""
  value = config_model.get("bn_groups", 1)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"config.model.bn_groups must be an integer >= 1, got {value!r}")
  return int(value)


def head_batch_norm(num_features: int, *, running_var: str = "biased",
                    running_stats: str = "mean_of_groups", dtype: Any = jnp.float32,
                    momentum: float = 0.9, epsilon: float = 1e-5, rngs: nnx.Rngs,
                    **kwargs) -> BatchNorm:
  """A head's BN: the stock Flax code (`cpu_kernel=False`), PyTorch's momentum 0.1 (Flax 0.9)
  and epsilon 1e-5; other keyword arguments go to `nnx.BatchNorm` (e.g. `use_bias=False`)."""
  return BatchNorm(
      num_features, running_var=running_var, running_stats=running_stats, cpu_kernel=False,
      momentum=momentum, epsilon=epsilon, dtype=dtype, rngs=rngs, **kwargs)
