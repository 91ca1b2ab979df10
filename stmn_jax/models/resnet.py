"""ResNet backbone in Flax NNX (NHWC), laid out like torchvision's ResNet v1.5.

The network is split where video re-ID models need it:
- `ResNetTrunk`: stem (7x7/2 conv, BN, optional ReLU, 3x3/2 max-pool) + layer1..layer3,
  `(N, H, W, 3) -> (N, H/16, W/16, C3)`;
- `ResNetStage`: layer4 alone, `(N, h, w, C3) -> (N, h/stride, w/stride, C4)`, so a model can
  hold several copies (STMN keeps three) with different strides / final ReLU.

Conventions (torchvision): Bottleneck v1.5 puts the stride on the 3x3 conv; BasicBlock for
depth 18/34; the downsample path is a 1x1 conv + BN; convolutions have no bias. BatchNorm
uses Flax momentum 0.9 (= PyTorch 0.1), epsilon 1e-5, float32 statistics. `dtype` is the
compute dtype (e.g. bfloat16); parameters are always float32. Attribute names follow the
torchvision state-dict keys (conv1, bn1, layer1[0].conv1, ..., downsample_conv/bn for
`downsample.0/1`) so `torchvision_weights` can map weights one to one.

Speed on XLA:CPU (`kernels` / `set_kernels`, chosen at trace time, "auto" = by backend; the
rewrites live in `models/cpu_kernels.py`): BatchNorm's training statistics (two-pass variance,
tree-reduced column sums) and closed-form gradient (`BatchNorm` of `models/batch_norm.py`,
`batch_norm_train`; with ghost-BN groups `batch_norm.ghost_batch_norm_train`) and the
stem's max-pool as 9 strided slices (`max_pool_slices`), with hand-written gradients; other
backends keep the stock Flax / XLA ops. Same variables and the same function either way
(tests/test_speed_equivalence.py).

Width multiplier: every channel count (stem and the `planes` of each stage) is scaled by
`width` and rounded to the nearest multiple of 8, with at least 8 channels
(`scaled_channels`). With `width=1.0` the network is exactly torchvision's.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stmn_jax.models.batch_norm import (  # noqa: F401  (re-exported)
    RUNNING_STATS_MODES, RUNNING_VAR_MODES, BatchNorm, Groups, bn_groups, bn_running_stats,
    bn_running_var)
from stmn_jax.models.cpu_kernels import (  # noqa: F401  (the kernel switch, re-exported)
    KERNEL_MODES, batch_norm_train, kernels, max_pool_slices, set_kernels, use_fast_kernels)

Dtype = Any

# depth -> (block type, blocks per stage), as torchvision.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
BASE_PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64
STAGE_STRIDES = (1, 2, 2, 2)  # torchvision strides of layer1..layer4
BN_MOMENTUM = 0.9  # Flax convention: new = m * old + (1 - m) * batch; PyTorch momentum 0.1
BN_EPSILON = 1e-5

INIT_BLOCK = 1 << 16  # normals are drawn in blocks of this size (see `conv_kernel_init`)

@jax.jit
def _normal_block(key: jax.Array, index: jax.Array) -> jax.Array:
  return jax.random.normal(jax.random.fold_in(key, index), (INIT_BLOCK,), jnp.float32)


def conv_kernel_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
  """torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")` for HWIO kernels.

  An untruncated normal with std sqrt(2 / (kh * kw * out)). The normals come from one jitted
  fixed-size sampler (block i uses `fold_in(key, i)`), so XLA compiles the random generator
  once per process instead of once per kernel shape (seconds each on a busy CPU).
  """
  shape = tuple(int(d) for d in shape)
  n = math.prod(shape)
  blocks = tuple(_normal_block(key, jnp.int32(i)) for i in range(-(-n // INIT_BLOCK)))
  return _scale_blocks(blocks, shape, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _scale_blocks(blocks: tuple[jax.Array, ...], shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
  kh, kw, _, out = shape
  z = jnp.concatenate(blocks)[: math.prod(shape)].reshape(shape)
  return (z * math.sqrt(2.0 / (kh * kw * out))).astype(dtype)


def _block_spec(depth: int) -> tuple[str, tuple[int, int, int, int]]:
  if depth not in DEPTHS:
    raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth!r}")
  return DEPTHS[depth]


def scaled_channels(channels: int, width: float) -> int:
  """`channels * width` rounded to the nearest multiple of 8, at least 8."""
  if not width > 0:
    raise ValueError(f"ResNet width multiplier must be > 0, got {width!r}")
  return max(8, int(round(channels * width / 8.0)) * 8)


def stem_channels(width: float) -> int:
  """Output channels of the stem conv (64 at width 1)."""
  return scaled_channels(STEM_CHANNELS, width)


def stage_planes(depth: int, width: float) -> tuple[int, int, int, int]:
  """Inner ("planes") channels of layer1..layer4 (64, 128, 256, 512 at width 1)."""
  return tuple(scaled_channels(p, width) for p in BASE_PLANES)  # type: ignore[return-value]


def stage_channels(depth: int, width: float) -> tuple[int, int, int, int]:
  """Output channels of layer1..layer4: planes * expansion.

  ResNet-50 at width 1: (256, 512, 1024, 2048); ResNet-18/34: (64, 128, 256, 512).
  """
  kind, _ = _block_spec(depth)
  return tuple(p * EXPANSION[kind] for p in stage_planes(depth, width))  # type: ignore[return-value]


class Conv(nnx.Module):
  """Bias-free 2D convolution, NHWC, torchvision-style symmetric padding `k // 2`.

  The kernel is an `nnx.Param` `(kh, kw, in, out)` (the `nnx.Conv` layout). 1x1 convolutions
  are computed as a matrix product on the flattened `(N*H*W, C)` tensor (after `[::s, ::s]`
  slicing for stride s), which gives the same result as `lax.conv_general_dilated` and is
  faster on CPU; other kernels use `lax.conv_general_dilated`.
  `(N, H, W, in) -> (N, ceil(H/s), ceil(W/s), out)` for odd kernels.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int,
      stride: int = 1,
      dtype: Dtype = jnp.float32,
      *,
      rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = kernel_size // 2
    self.dtype = dtype
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(conv_kernel_init(rngs.params(), shape, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(
          f"Conv expects {self.in_features} input channels (last axis), got shape {x.shape}"
      )
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    s = self.stride
    if self.kernel_size == 1:
      if s > 1:
        x = x[:, ::s, ::s, :]
      n, h, w, c = x.shape
      y = jnp.dot(x.reshape(n * h * w, c), kernel[0, 0])
      return y.reshape(n, h, w, self.out_features)
    p = self.padding
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(s, s),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def batch_norm(num_features: int, dtype: Dtype, rngs: nnx.Rngs, zero_init: bool = False,
               running_var: str = "biased", running_stats: str = "mean_of_groups") -> BatchNorm:
  """BN as torchvision (momentum 0.1 PyTorch, eps 1e-5), float32 params and statistics, with the
  XLA:CPU rewrite (`models/batch_norm.py`).

  `running_var="biased"` (default, Flax's) updates the running variance with the biased batch
  variance; "unbiased" as PyTorch / the official STMN code (factor n / (n - 1), n = N*H*W per
  channel; `config.model.bn_running_var`). Outputs in both modes match either way.
  `running_stats`: which groups' statistics the running ones follow under ghost BN
  (`config.model.bn_running_stats`).
  """
  return BatchNorm(
      num_features,
      running_var=running_var,
      running_stats=running_stats,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
      rngs=rngs,
  )


class BasicBlock(nnx.Module):
  """Two 3x3 convs (stride on the first) + identity / 1x1-conv shortcut.

  `(N, H, W, in) -> (N, H/stride, W/stride, planes)`. `final_relu=False` drops the ReLU after
  the residual add.
  """

  expansion = 1

  def __init__(
      self,
      in_features: int,
      planes: int,
      stride: int = 1,
      final_relu: bool = True,
      zero_init_residual: bool = False,
      dtype: Dtype = jnp.float32,
      *,
      bn_running_var: str = "biased",
      bn_running_stats: str = "mean_of_groups",
      rngs: nnx.Rngs,
  ):
    out = planes * self.expansion
    self.final_relu = final_relu
    bn = functools.partial(
        batch_norm, running_var=bn_running_var, running_stats=bn_running_stats)
    self.conv1 = Conv(in_features, planes, 3, stride, dtype, rngs=rngs)
    self.bn1 = bn(planes, dtype, rngs)
    self.conv2 = Conv(planes, out, 3, 1, dtype, rngs=rngs)
    self.bn2 = bn(out, dtype, rngs, zero_init=zero_init_residual)
    self.has_downsample = stride != 1 or in_features != out
    if self.has_downsample:
      self.downsample_conv = Conv(in_features, out, 1, stride, dtype, rngs=rngs)
      self.downsample_bn = bn(out, dtype, rngs)

  def __call__(self, x: jax.Array, groups: Groups | None = None) -> jax.Array:
    """`groups`: ghost-BN tracklet groups (`models/batch_norm.py`), None = the whole batch."""
    y = nnx.relu(self.bn1(self.conv1(x), groups=groups))
    y = self.bn2(self.conv2(y), groups=groups)
    shortcut = (self.downsample_bn(self.downsample_conv(x), groups=groups)
                if self.has_downsample else x)
    y = y + shortcut.astype(y.dtype)
    return nnx.relu(y) if self.final_relu else y


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4 channels) + identity / 1x1-conv shortcut.

  `(N, H, W, in) -> (N, H/stride, W/stride, 4 * planes)`. `final_relu=False` drops the ReLU
  after the residual add (STMN's `Bottleneck_key`).
  """

  expansion = 4

  def __init__(
      self,
      in_features: int,
      planes: int,
      stride: int = 1,
      final_relu: bool = True,
      zero_init_residual: bool = False,
      dtype: Dtype = jnp.float32,
      *,
      bn_running_var: str = "biased",
      bn_running_stats: str = "mean_of_groups",
      rngs: nnx.Rngs,
  ):
    out = planes * self.expansion
    self.final_relu = final_relu
    bn = functools.partial(
        batch_norm, running_var=bn_running_var, running_stats=bn_running_stats)
    self.conv1 = Conv(in_features, planes, 1, 1, dtype, rngs=rngs)
    self.bn1 = bn(planes, dtype, rngs)
    self.conv2 = Conv(planes, planes, 3, stride, dtype, rngs=rngs)
    self.bn2 = bn(planes, dtype, rngs)
    self.conv3 = Conv(planes, out, 1, 1, dtype, rngs=rngs)
    self.bn3 = bn(out, dtype, rngs, zero_init=zero_init_residual)
    self.has_downsample = stride != 1 or in_features != out
    if self.has_downsample:
      self.downsample_conv = Conv(in_features, out, 1, stride, dtype, rngs=rngs)
      self.downsample_bn = bn(out, dtype, rngs)

  def __call__(self, x: jax.Array, groups: Groups | None = None) -> jax.Array:
    """`groups`: ghost-BN tracklet groups (`models/batch_norm.py`), None = the whole batch."""
    y = nnx.relu(self.bn1(self.conv1(x), groups=groups))
    y = nnx.relu(self.bn2(self.conv2(y), groups=groups))
    y = self.bn3(self.conv3(y), groups=groups)
    shortcut = (self.downsample_bn(self.downsample_conv(x), groups=groups)
                if self.has_downsample else x)
    y = y + shortcut.astype(y.dtype)
    return nnx.relu(y) if self.final_relu else y


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(
    depth: int,
    width: float,
    index: int,
    stride: int | None = None,
    final_relu: bool = True,
    zero_init_residual: bool = False,
    dtype: Dtype = jnp.float32,
    *,
    bn_running_var: str = "biased",
    bn_running_stats: str = "mean_of_groups",
    rngs: nnx.Rngs,
) -> nnx.List:
  """Blocks of stage `index` (0..3 = layer1..layer4) as an `nnx.List`.

  `stride=None` uses torchvision's stride for that stage (1, 2, 2, 2). `final_relu=False`
  removes the ReLU after the residual add of the last block only. `bn_running_var`: see
  `batch_norm`.
  """
  if index not in range(4):
    raise ValueError(f"stage index must be 0..3 (layer1..layer4), got {index!r}")
  kind, counts = _block_spec(depth)
  block_cls = BLOCKS[kind]
  planes = stage_planes(depth, width)[index]
  in_features = stem_channels(width) if index == 0 else stage_channels(depth, width)[index - 1]
  stride = STAGE_STRIDES[index] if stride is None else stride
  if stride not in (1, 2):
    raise ValueError(f"stage stride must be 1 or 2, got {stride!r}")
  blocks = []
  for b in range(counts[index]):
    last = b == counts[index] - 1
    blocks.append(
        block_cls(
            in_features,
            planes,
            stride if b == 0 else 1,
            final_relu=final_relu or not last,
            zero_init_residual=zero_init_residual,
            dtype=dtype,
            bn_running_var=bn_running_var,
            bn_running_stats=bn_running_stats,
            rngs=rngs,
        )
    )
    in_features = planes * block_cls.expansion
  return nnx.List(blocks)


def _run(blocks: Sequence[nnx.Module], x: jax.Array, groups: Groups | None) -> jax.Array:
  for block in blocks:
    x = block(x, groups)
  return x


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torchvision `MaxPool2d(3, stride=2, padding=1)` (padding never wins: -inf).

  `(N, H, W, C) -> (N, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1, C)`. On XLA:CPU
  (`use_fast_kernels()`) the same function via `max_pool_slices`.
  """
  if use_fast_kernels():
    return max_pool_slices(x)
  return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNetTrunk(nnx.Module):
  """Stem + layer1..layer3: `(N, H, W, 3) -> (N, H/16, W/16, C3)` (ceil divisions).

  `stem_relu=True` is the paper's / torchvision's stem (conv, BN, ReLU, max-pool);
  `stem_relu=False` reproduces the official STMN code, whose forward pass skips that ReLU.
  `zero_init_residual` zero-initialises the last BN scale of each block (torchvision option,
  off by default). `bn_running_var`: see `batch_norm`.
  """

  def __init__(
      self,
      depth: int = 50,
      width: float = 1.0,
      stem_relu: bool = True,
      dtype: Dtype = jnp.float32,
      zero_init_residual: bool = False,
      *,
      bn_running_var: str = "biased",
      bn_running_stats: str = "mean_of_groups",
      rngs: nnx.Rngs,
  ):
    self.depth = depth
    self.width = width
    self.stem_relu = stem_relu
    self.dtype = dtype
    self.out_features = stage_channels(depth, width)[2]
    stem = stem_channels(width)
    self.conv1 = Conv(3, stem, 7, 2, dtype, rngs=rngs)
    self.bn1 = batch_norm(stem, dtype, rngs, running_var=bn_running_var,
                          running_stats=bn_running_stats)
    kw = dict(zero_init_residual=zero_init_residual, dtype=dtype, bn_running_var=bn_running_var,
              bn_running_stats=bn_running_stats, rngs=rngs)
    self.layer1 = make_stage(depth, width, 0, **kw)
    self.layer2 = make_stage(depth, width, 1, **kw)
    self.layer3 = make_stage(depth, width, 2, **kw)

  def __call__(self, x: jax.Array, groups: Groups | None = None) -> jax.Array:
    """`groups`: ghost-BN tracklet groups (`models/batch_norm.py`), None = the whole batch."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNetTrunk expects NHWC images (N, H, W, 3), got shape {x.shape}")
    x = self.bn1(self.conv1(x), groups=groups)
    if self.stem_relu:
      x = nnx.relu(x)
    x = max_pool_3x3_s2(x)
    x = _run(self.layer1, x, groups)
    x = _run(self.layer2, x, groups)
    return _run(self.layer3, x, groups)


class ResNetStage(nnx.Module):
  """layer4 alone: `(N, h, w, C3) -> (N, h/stride, w/stride, C4)`.

  `stride=1` is the re-ID "last stride 1" variant (torchvision uses 2). `final_relu=False`
  drops the ReLU after the residual add of the last block only (STMN's key heads).
  Blocks are in `self.blocks` (torchvision `layer4.<i>`). `bn_running_var`: see `batch_norm`.
  """

  def __init__(
      self,
      depth: int = 50,
      width: float = 1.0,
      stride: int = 1,
      final_relu: bool = True,
      dtype: Dtype = jnp.float32,
      zero_init_residual: bool = False,
      *,
      bn_running_var: str = "biased",
      bn_running_stats: str = "mean_of_groups",
      rngs: nnx.Rngs,
  ):
    self.depth = depth
    self.width = width
    self.stride = stride
    self.final_relu = final_relu
    self.dtype = dtype
    self.in_features = stage_channels(depth, width)[2]
    self.out_features = stage_channels(depth, width)[3]
    self.blocks = make_stage(
        depth, width, 3, stride, final_relu, zero_init_residual, dtype,
        bn_running_var=bn_running_var, bn_running_stats=bn_running_stats, rngs=rngs)

  def __call__(self, x: jax.Array, groups: Groups | None = None) -> jax.Array:
    """`groups`: ghost-BN tracklet groups (`models/batch_norm.py`), None = the whole batch."""
    if x.ndim != 4 or x.shape[-1] != self.in_features:
      raise ValueError(
          f"ResNetStage expects (N, h, w, {self.in_features}) features, got shape {x.shape}"
      )
    return _run(self.blocks, x, groups)


# ------------------------------------------------------------------------------ from a config
def compute_dtype(name: Any) -> Dtype:
  """`config.model.dtype` ("float32", "bfloat16", ...) -> a jnp dtype; ValueError if unknown."""
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(
        f"config.model.dtype: unknown dtype {name!r} (expected e.g. float32, bfloat16)") from e


def stage_from_config(
    config_model: Any, *, final_relu: bool = True, rngs: nnx.Rngs
) -> ResNetStage:
  """layer4 from `config.model` (depth, width, last_stride, dtype, bn_running_var,
  bn_running_stats): `ResNetStage`."""
  m = config_model
  return ResNetStage(
      m.depth, m.width, m.last_stride, final_relu, compute_dtype(m.dtype),
      bn_running_var=bn_running_var(m), bn_running_stats=bn_running_stats(m), rngs=rngs)


def backbone_from_config(config_model: Any, *, rngs: nnx.Rngs) -> tuple[ResNetTrunk, ResNetStage]:
  """The re-ID backbone from `config.model` (depth, width, stem_relu, last_stride, dtype,
  bn_running_var, bn_running_stats):
  (trunk (N, H, W, 3) -> (N, H/16, W/16, C3), layer4 with its final ReLU -> (N, h, w, C4)).

  Created in that order (the order decides which random numbers each gets). A model keeps them
  as attributes (`trunk`, `stage`, ...): `models.load_pretrained` finds them by type, whatever
  their names, and loads the torchvision stem + layer1-3 into the trunk, layer4 into the stage.
  """
  m = config_model
  trunk = ResNetTrunk(m.depth, m.width, m.stem_relu, compute_dtype(m.dtype),
                      bn_running_var=bn_running_var(m), bn_running_stats=bn_running_stats(m),
                      rngs=rngs)
  return trunk, stage_from_config(m, rngs=rngs)
