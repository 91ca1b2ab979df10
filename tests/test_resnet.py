"""ResNet backbone against a plain-PyTorch torchvision-equivalent ResNet on the same weights.

torchvision is not installed (and must not be): `TorchResNet` below is a minimal module tree
with torchvision's state-dict key names (conv1, bn1, layerK.i.convJ/bnJ, layerK.0.downsample.0/1,
fc). Tolerance used for float32 features: max |jax - torch| <= 1e-4 * max |torch| (relative to
the feature scale, since random BN statistics make the absolute scale arbitrary).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from stmn_jax.models import resnet
from stmn_jax.models import torchvision_weights as tvw

torch.set_num_threads(1)

# ------------------------------------------------------------- torch reference (test only)

TORCH_LAYERS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}


def _ch(c: int, width: float) -> int:
  return max(8, int(round(c * width / 8.0)) * 8)


class TorchBasic(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, downsample, final_relu=True):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample
    self.final_relu = final_relu

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    y = y + (self.downsample(x) if self.downsample is not None else x)
    return self.relu(y) if self.final_relu else y


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, downsample, final_relu=True):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample
    self.final_relu = final_relu

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    y = y + (self.downsample(x) if self.downsample is not None else x)
    return self.relu(y) if self.final_relu else y


class TorchResNet(nn.Module):
  """torchvision.models.resnet{18,34,50} layout, with a width multiplier and options."""

  def __init__(self, depth=50, width=1.0, last_stride=2, stem_relu=True, final_relu=True,
               num_classes=10):
    super().__init__()
    kind, counts = TORCH_LAYERS[depth]
    block = TorchBasic if kind == "basic" else TorchBottleneck
    self.stem_relu = stem_relu
    cin = _ch(64, width)
    self.conv1 = nn.Conv2d(3, cin, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(cin)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    for k, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), counts, (1, 2, 2, last_stride))):
      planes = _ch(planes, width)
      blocks = []
      for i in range(n):
        s = stride if i == 0 else 1
        ds = None
        if i == 0 and (s != 1 or cin != planes * block.expansion):
          ds = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, s, bias=False),
                             nn.BatchNorm2d(planes * block.expansion))
        last = k == 3 and i == n - 1
        blocks.append(block(cin, planes, s, ds, final_relu=final_relu or not last))
        cin = planes * block.expansion
      setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def trunk(self, x):
    x = self.bn1(self.conv1(x))
    if self.stem_relu:
      x = self.relu(x)
    x = self.maxpool(x)
    return self.layer3(self.layer2(self.layer1(x)))

  def forward(self, x):
    return self.layer4(self.trunk(x))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random conv weights and random BN affine parameters AND running statistics; eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_out))
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(7)
  return model.eval()


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def to_nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def from_nchw(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_close_rel(actual, expected, rel=1e-4):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = np.abs(expected).max()
  assert scale > 0
  err = np.abs(actual - expected).max()
  assert err <= rel * scale, f"max abs err {err:.3g} > {rel} * scale {scale:.3g}"


def jax_models(depth, width, strides=(1,), stem_relu=True, final_relu=True, dtype=jnp.float32,
               state_dict=None):
  """A JAX trunk and one stage per stride, abstract-initialised then filled from `state_dict`."""
  trunk = nnx.eval_shape(lambda: resnet.ResNetTrunk(depth, width, stem_relu, dtype, rngs=nnx.Rngs(0)))
  tvw.load_into_trunk(trunk, state_dict)
  trunk.eval()
  stages = []
  for stride in strides:
    stage = nnx.eval_shape(
        lambda s=stride: resnet.ResNetStage(depth, width, s, final_relu, dtype, rngs=nnx.Rngs(0)))
    tvw.load_into_stage(stage, state_dict)
    stage.eval()
    stages.append(stage)
  return trunk, stages


def torch_layer4(tm: "TorchResNet", depth, width, stride, final_relu=True) -> nn.Module:
  """`tm.layer4` rebuilt with another last stride (same weights)."""
  other = TorchResNet(depth, width, stride, final_relu=final_relu)
  other.load_state_dict(tm.state_dict())
  return other.eval().layer4


def images(n=2, h=64, w=32, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)


run = nnx.jit(lambda module, x: module(x))


# ------------------------------------------------------------------------------------ tests


def test_stage_channels():
  assert resnet.stage_channels(50, 1.0) == (256, 512, 1024, 2048)
  assert resnet.stage_channels(18, 1.0) == (64, 128, 256, 512)
  assert resnet.stage_channels(34, 1.0) == (64, 128, 256, 512)
  for depth, mult in ((18, 1), (50, 4)):
    for width in (0.125, 0.3, 0.5, 2.0):
      expected = tuple(mult * max(8, 8 * round(p * width / 8)) for p in (64, 128, 256, 512))
      assert resnet.stage_channels(depth, width) == expected
      assert all(c % 8 == 0 for c in expected)
  assert resnet.stage_channels(18, 0.01) == (8, 8, 8, 8)
  with pytest.raises(ValueError, match="depth"):
    resnet.stage_channels(42, 1.0)
  with pytest.raises(ValueError, match="width"):
    resnet.stage_channels(50, 0.0)


@pytest.mark.parametrize("stride,h,w", [(1, 8, 6), (2, 8, 6), (2, 7, 5)])
def test_conv1x1_matches_lax_conv(stride, h, w):
  conv = resnet.Conv(16, 24, 1, stride, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, h, w, 16))
  ref = jax.lax.conv_general_dilated(
      x, conv.kernel[...], (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = conv(x)
  assert y.shape == ref.shape == (2, -(-h // stride), -(-w // stride), 24)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,stride,h,w", [(3, 1, 9, 7), (3, 2, 9, 7), (7, 2, 10, 6)])
def test_conv_matches_torch_conv2d(k, stride, h, w):
  conv = resnet.Conv(4, 6, k, stride, rngs=nnx.Rngs(0))
  x = images(2, h, w)[..., :3].repeat(2, axis=-1)[..., :4]
  weight = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy())
  ref = torch.nn.functional.conv2d(to_nchw(x), weight, stride=stride, padding=k // 2)
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), from_nchw(ref), rtol=1e-5, atol=1e-5)


def test_conv_init_is_kaiming_fan_out():
  conv = resnet.Conv(64, 256, 3, rngs=nnx.Rngs(0))
  k = np.asarray(conv.kernel[...])
  assert k.shape == (3, 3, 64, 256) and k.dtype == np.float32
  np.testing.assert_allclose(k.std(), math.sqrt(2.0 / (9 * 256)), rtol=0.02)
  assert np.abs(k.mean()) < 0.01 * k.std()
  assert np.abs(k).max() > 3.5 * k.std()  # untruncated normal (truncated would stop at 2 sigma)
  assert k.size > resnet.INIT_BLOCK  # several sampler blocks, which must be independent:
  flat = k.reshape(-1)
  assert not np.allclose(flat[:1000], flat[resnet.INIT_BLOCK:resnet.INIT_BLOCK + 1000])
  key = jax.random.key(3)  # same values eagerly and under jit (e.g. init inside nnx.jit), up
  # to float32 rounding: eager ops compiled while another module disabled XLA's optimisations
  # (conftest.fast_compiles) stay cached and may round the last bit differently.
  eager = resnet.conv_kernel_init(key, (1, 1, 8, 16))
  jitted = jax.jit(lambda r: resnet.conv_kernel_init(r, (1, 1, 8, 16)))(key)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=0)


def test_parameter_count_matches_torch_resnet50():
  trunk = nnx.eval_shape(lambda: resnet.ResNetTrunk(50, 1.0, rngs=nnx.Rngs(0)))
  stage = nnx.eval_shape(lambda: resnet.ResNetStage(50, 1.0, rngs=nnx.Rngs(0)))
  count = lambda m: sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  tm = TorchResNet(50, 1.0)
  expected = sum(p.numel() for n, p in tm.named_parameters() if not n.startswith("fc."))
  assert count(trunk) + count(stage) == expected
  stats = lambda m: sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(m, nnx.BatchStat)))
  expected_stats = sum(b.numel() for n, b in tm.named_buffers() if not n.endswith("num_batches_tracked"))
  assert stats(trunk) + stats(stage) == expected_stats


@pytest.mark.parametrize("depth", [18, 50])
def test_forward_matches_torch(depth):
  """Full-width ResNet-18/50: trunk (after layer3) and layer4 with last stride 1 and 2."""
  tm = randomize(TorchResNet(depth, 1.0, last_stride=1), seed=depth)
  trunk, stages = jax_models(depth, 1.0, (1, 2), state_dict=numpy_state_dict(tm))
  x = images(2, 64, 32, seed=1)
  with torch.no_grad():
    ref_mid = tm.trunk(to_nchw(x))
    refs = [tm.layer4(ref_mid), torch_layer4(tm, depth, 1.0, 2)(ref_mid)]
  mid = run(trunk, jnp.asarray(x))
  c3, c4 = resnet.stage_channels(depth, 1.0)[2:]
  assert mid.shape == (2, 4, 2, c3)
  assert_close_rel(mid, from_nchw(ref_mid))
  for stride, stage, ref in zip((1, 2), stages, refs):
    out = run(stage, mid)
    assert out.shape == (2, 4 // stride, 2 // stride, c4)
    assert_close_rel(out, from_nchw(ref))


def test_stem_relu_off_and_final_relu_off_match_torch():
  """The official-STMN options: no stem ReLU, no ReLU after the last layer4 block."""
  tm = randomize(TorchResNet(50, 0.25, 1, stem_relu=False, final_relu=False), seed=3)
  trunk, (stage,) = jax_models(50, 0.25, (1,), stem_relu=False, final_relu=False,
                               state_dict=numpy_state_dict(tm))
  x = images(2, 64, 32, seed=4)
  with torch.no_grad():
    ref = from_nchw(tm(to_nchw(x)))
  out = run(stage, run(trunk, jnp.asarray(x)))
  assert_close_rel(out, ref)
  assert (ref < 0).any()  # no final ReLU: negative values survive
  # only the last block lost its ReLU
  assert not stage.blocks[-1].final_relu and all(b.final_relu for b in stage.blocks[:-1])
  # and the options matter: the standard model's output differs
  tm_std = TorchResNet(50, 0.25, 1, stem_relu=True, final_relu=True)
  tm_std.load_state_dict(tm.state_dict())
  with torch.no_grad():
    ref_std = from_nchw(tm_std.eval()(to_nchw(x)))
  assert np.abs(ref_std - ref).max() > 1e-2 * np.abs(ref).max()


def test_odd_input_size_and_bfloat16_match_torch():
  """50x30 input (ceil-size arithmetic of pool / stride 2), then bf16 compute vs torch f32."""
  tm = randomize(TorchResNet(18, 0.25, 2), seed=5)
  sd = numpy_state_dict(tm)
  x = images(2, 50, 30, seed=6)
  with torch.no_grad():
    ref = from_nchw(tm(to_nchw(x)))
  trunk, (stage,) = jax_models(18, 0.25, (2,), state_dict=sd)
  out = run(stage, run(trunk, jnp.asarray(x)))
  assert out.shape == ref.shape == (2, 2, 1, resnet.stage_channels(18, 0.25)[3])
  assert_close_rel(out, ref)

  trunk16, (stage16,) = jax_models(18, 0.25, (2,), dtype=jnp.bfloat16, state_dict=sd)
  state = nnx.state((trunk16, stage16))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))  # params and BN stats
  out16 = run(stage16, run(trunk16, jnp.asarray(x)))
  assert out16.dtype == jnp.bfloat16
  out16 = np.asarray(out16.astype(jnp.float32))
  rel = np.linalg.norm(out16 - ref) / np.linalg.norm(ref)
  assert 0 < rel < 0.05, rel


def test_train_mode_batch_stats_match_torch():
  """Train-mode BN: same outputs as torch; running mean uses PyTorch momentum 0.1.

  Known difference: torch updates running_var with the unbiased batch variance (n / (n - 1)),
  nnx.BatchNorm with the biased one; checked here on bn1 (n = N * H/2 * W/2).
  """
  tm = randomize(TorchResNet(18, 0.25, 2), seed=7)
  trunk, _ = jax_models(18, 0.25, (), state_dict=numpy_state_dict(tm))
  old_mean = tm.bn1.running_mean.clone().numpy()
  old_var = tm.bn1.running_var.clone().numpy()
  tm.train()
  trunk.train()
  x = images(4, 32, 16, seed=8)
  with torch.no_grad():
    ref = from_nchw(tm.trunk(to_nchw(x)))
  out = run(trunk, jnp.asarray(x))
  assert_close_rel(out, ref, rel=1e-4)
  np.testing.assert_allclose(np.asarray(trunk.bn1.mean[...]), tm.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-5)
  n = 4 * 16 * 8
  unbiased = (tm.bn1.running_var.numpy() - 0.9 * old_var) / 0.1
  np.testing.assert_allclose(np.asarray(trunk.bn1.var[...]), 0.9 * old_var + 0.1 * unbiased * (n - 1) / n,
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.asarray(trunk.bn1.mean[...]), old_mean)
  np.testing.assert_allclose(  # deep layers too
      np.asarray(trunk.layer3[-1].bn2.mean[...]), tm.layer3[-1].bn2.running_mean.numpy(), rtol=1e-3, atol=1e-4)


def test_unbiased_running_variance_from_config_matches_torch():
  """`config.model.bn_running_var="unbiased"` reaches every BN of the backbone
  (`backbone_from_config`), and the running variances after one training step are PyTorch's."""
  tm = randomize(TorchResNet(18, 0.25, 2), seed=7)
  config_model = ml_collections.ConfigDict(dict(
      depth=18, width=0.25, stem_relu=True, last_stride=2, dtype="float32",
      bn_running_var="unbiased"))
  trunk, stage = nnx.eval_shape(lambda: resnet.backbone_from_config(config_model, rngs=nnx.Rngs(0)))
  bns = [m for _, m in nnx.iter_modules((trunk, stage)) if isinstance(m, nnx.BatchNorm)]
  assert len(bns) == 20 and all(bn.running_var == "unbiased" for bn in bns)
  tvw.load_into_trunk(trunk, numpy_state_dict(tm))
  tm.train()
  trunk.train()
  x = images(4, 32, 16, seed=8)
  with torch.no_grad():
    ref = from_nchw(tm.trunk(to_nchw(x)))
  assert_close_rel(run(trunk, jnp.asarray(x)), ref, rel=1e-4)
  pairs = [(trunk.bn1, tm.bn1), (trunk.layer1[0].bn2, tm.layer1[0].bn2),
           (trunk.layer2[0].downsample_bn, tm.layer2[0].downsample[1]),
           (trunk.layer3[-1].bn2, tm.layer3[-1].bn2)]
  for ours, theirs in pairs:
    np.testing.assert_allclose(np.asarray(ours.var[...]), theirs.running_var.numpy(),
                               rtol=1e-4, atol=1e-6)
  config_model.bn_running_var = "pytorch"
  with pytest.raises(ValueError, match="bn_running_var"):
    resnet.backbone_from_config(config_model, rngs=nnx.Rngs(0))


def test_zero_init_residual_and_bad_input():
  stage = resnet.ResNetStage(50, 0.125, zero_init_residual=True, rngs=nnx.Rngs(0))
  assert all(np.all(np.asarray(b.bn3.scale[...]) == 0) for b in stage.blocks)
  assert np.all(np.asarray(stage.blocks[0].downsample_bn.scale[...]) == 1)
  trunk = resnet.ResNetTrunk(18, 0.125, rngs=nnx.Rngs(0))
  assert np.all(np.asarray(trunk.layer1[0].bn2.scale[...]) == 1)
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    trunk(jnp.zeros((2, 3, 64, 32)))
  with pytest.raises(ValueError, match="ResNetStage expects"):
    stage(jnp.zeros((1, 4, 2, 7)))
  with pytest.raises(ValueError, match="stride"):
    resnet.ResNetStage(18, 0.125, stride=3, rngs=nnx.Rngs(0))
