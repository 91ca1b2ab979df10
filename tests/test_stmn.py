"""STMN model, baseline and ablations; the model registry; parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import mars
from stmn_jax import losses, models
from stmn_jax.models import batch_norm, memory, resnet, stmn, torchvision_weights

B, L, H, W = 2, 4, 64, 32
C = 5
PRESETS = ("stmn", "stmn_nospread", "sm", "sm_nospread", "tm", "tm_nospread", "baseline")


def _config(preset="stmn"):
  config = mars.get_config(f"{preset},smoke")  # depth 18, width 0.125, 64x32, L=4
  assert (config.data.height, config.data.width, config.data.seq_len) == (H, W, L)
  return config


def _frames(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, H, W, 3)), jnp.float32)


pytestmark = pytest.mark.usefixtures("fast_compiles")


@nnx.jit(static_argnames="return_maps")
def _forward(model, frames, return_maps=False):
  return model(frames, return_maps=return_maps)


@pytest.fixture(scope="module")
def full_model():
  return models.create_model(_config("stmn"), C, nnx.Rngs(0))


@pytest.mark.parametrize("preset", PRESETS)
def test_output_shapes_for_every_preset(preset):
  config = _config(preset)
  model = nnx.eval_shape(lambda: models.create_model(config, C, nnx.Rngs(1)))
  out = nnx.eval_shape(lambda m, f: m(f), model, _frames())
  d = resnet.stage_channels(18, 0.125)[3]
  h, w = H // 16, W // 16  # last stride 1
  m, n = config.model.spatial_slots, config.model.temporal_slots
  expected = dict(embedding=(B, d), frame_logits=(B, L, C), seq_logits=(B, C),
                  frame_feats=(B, L, d), seq_feats=(B, d), frame_weights=(B, L))
  if config.model.spatial_memory:
    expected["spatial_probs"] = (B, L, h * w, m)
  if config.model.temporal_memory:
    expected["temporal_probs"] = (B, n)
  assert {k: v.shape for k, v in out.items()} == expected


def test_baseline_has_no_memory_and_pools_over_time():
  model = models.create_model(_config("baseline"), C, nnx.Rngs(2))
  for name in ("spatial_memory", "temporal_memory", "spatial_query_stage", "temporal_query_stage"):
    assert not hasattr(model, name)
  parts = models.count_parameters(model)
  assert set(parts) == {"trunk", "value_stage", "frame_neck", "seq_neck", "frame_classifier",
                        "seq_classifier"}
  frames = _frames(1)
  out = _forward(model, frames, return_maps=True)
  np.testing.assert_allclose(out["frame_weights"], np.full((B, L), 1 / L), rtol=1e-6)
  np.testing.assert_allclose(out["seq_feats"], np.asarray(out["frame_feats"]).mean(1), rtol=1e-5,
                             atol=1e-6)
  # frame features = GAP of layer4(trunk(x)), computed directly from the parts
  x = frames.reshape(B * L, H, W, 3)
  direct = nnx.jit(lambda m, x: m.value_stage(m.trunk(x)))(model, x)
  direct = np.asarray(direct).mean(axis=(1, 2))
  np.testing.assert_allclose(out["frame_feats"].reshape(B * L, -1), direct, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out["value_maps"], out["refined_maps"])


def test_ablations_allocate_only_their_query_copy():
  sm = models.create_model(_config("sm"), C, nnx.Rngs(0))
  tm = models.create_model(_config("tm"), C, nnx.Rngs(0))
  assert hasattr(sm, "spatial_query_stage") and not hasattr(sm, "temporal_query_stage")
  assert hasattr(tm, "temporal_query_stage") and not hasattr(tm, "spatial_query_stage")
  out = _forward(tm, _frames())
  np.testing.assert_allclose(np.asarray(out["frame_weights"]).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["temporal_probs"]).sum(-1), 1.0, rtol=1e-5)
  assert "spatial_probs" not in out and "temporal_probs" in out
  assert not np.allclose(out["frame_weights"], 1 / L)  # weights come from the memory


def test_stmn_wiring_in_eval_mode(full_model):
  model = full_model
  model.spatial_memory.bn.scale.value = jnp.ones_like(model.spatial_memory.bn.scale.value)
  model.eval()
  try:
    out = _forward(model, _frames(3), return_maps=True)
  finally:
    model.spatial_memory.bn.scale.value = jnp.zeros_like(model.spatial_memory.bn.scale.value)
    model.train()
  refined = np.asarray(out["refined_maps"])
  assert not np.allclose(refined, out["value_maps"])  # the memory changed the features
  frame = refined.mean(axis=(2, 3))
  np.testing.assert_allclose(out["frame_feats"], frame, rtol=1e-4, atol=1e-5)
  w = np.asarray(out["frame_weights"])
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["spatial_probs"]).sum(-1), 1.0, rtol=1e-5)
  seq = np.einsum("bl,bld->bd", w, frame)
  np.testing.assert_allclose(out["seq_feats"], seq, rtol=1e-4, atol=1e-5)
  # eval-mode BNNeck at init: running mean 0, var 1, scale 1, frozen bias 0
  emb = seq / np.sqrt(1 + 1e-5)
  np.testing.assert_allclose(out["embedding"], emb, rtol=1e-4, atol=1e-5)
  kernel = np.asarray(model.seq_classifier.kernel.value)
  np.testing.assert_allclose(out["seq_logits"], emb @ kernel, rtol=1e-4, atol=1e-6)
  change = np.asarray(stmn.feature_norm_change(out))
  np.testing.assert_allclose(
      change, np.linalg.norm(refined, axis=-1) - np.linalg.norm(out["value_maps"], axis=-1),
      rtol=1e-4, atol=1e-5)
  # heads: classifier init N(0, 0.001), no bias; BNNeck bias is a FrozenBias
  assert model.seq_classifier.bias is None and kernel.std() < 0.005
  assert isinstance(model.seq_neck.bias, stmn.FrozenBias)
  assert not isinstance(model.seq_neck.bias, nnx.Param)
  with pytest.raises(ValueError, match="seq_len"):
    model(_frames()[:, :3])


@pytest.fixture(scope="module")
def train_step_result():
  """One jitted Adam step (coupled weight decay) on a fresh STMN; grads and before / after."""
  config = _config("stmn")
  model = models.create_model(config, C, nnx.Rngs(5))
  # the read-out BN scale starts at 0 (paper / code), which blocks the spatial values'
  # gradient at initialisation; give it a non-zero scale to check that path
  model.spatial_memory.bn.scale.value = jnp.full_like(model.spatial_memory.bn.scale.value, 0.5)
  model.seq_neck.bias.value = jnp.full_like(model.seq_neck.bias.value, 0.25)  # any value
  before = {
      "seq_bias": np.asarray(model.seq_neck.bias.value),
      "frame_bias": np.asarray(model.frame_neck.bias.value),
      "seq_scale": np.asarray(model.seq_neck.bn.scale.value),
      "smem_keys": np.asarray(model.spatial_memory.mem_keys.value),
  }
  tx = optax.chain(optax.add_decayed_weights(1e-2), optax.adam(1e-1))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  frames = _frames(4)
  batch = {"pid": jnp.array([0, 1])}

  @nnx.jit
  def step(m, o):
    grads = nnx.grad(lambda mm: losses.total_loss(mm(frames), batch, config)[0])(m)
    o.update(m, grads)
    return grads

  grads = step(model, opt)
  return model, grads, before


def test_gradients_reach_memory_keys_and_values(train_step_result):
  _, grads, _ = train_step_result
  for part in ("spatial_memory", "temporal_memory"):
    for name in ("mem_keys", "mem_values"):
      g = np.asarray(grads[part][name].value)
      assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, (part, name)
  assert "bias" not in grads["seq_neck"]  # the frozen bias gets no gradient


def test_frozen_bias_unchanged_by_optimizer_step(train_step_result):
  model, _, before = train_step_result
  np.testing.assert_array_equal(model.seq_neck.bias.value, before["seq_bias"])
  np.testing.assert_array_equal(model.frame_neck.bias.value, before["frame_bias"])
  assert not np.allclose(model.seq_neck.bn.scale.value, before["seq_scale"])  # gamma trained
  assert not np.allclose(model.spatial_memory.mem_keys.value, before["smem_keys"])


def test_registry_errors_and_register():
  config = _config("stmn")
  config.model.name = "nope"
  with pytest.raises(ValueError, match="config.model.name"):
    models.create_model(config, C, nnx.Rngs(0))
  sentinel = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  models.register("tiny_test_model")(lambda cfg, n, *, rngs: sentinel)
  config.model.name = "tiny_test_model"
  assert models.create_model(config, C, nnx.Rngs(0)) is sentinel
  assert {"stmn", "drsa", "sta"} <= set(models.available())


def test_pretrained_loads_into_trunk_and_every_layer4_copy(tmp_path):
  config = _config("stmn")
  donor = models.create_model(config, C, nnx.Rngs(9))
  rng = np.random.default_rng(0)
  state_dict = {}
  entries = torchvision_weights.trunk_entries(donor.trunk) + torchvision_weights.stage_entries(
      donor.value_stage)
  for key, var, kind in entries:
    shape = var.value.shape
    if kind == "conv":
      shape = (shape[3], shape[2], shape[0], shape[1])
    state_dict[key] = rng.normal(size=shape).astype(np.float32)
  path = str(tmp_path / "r18.npz")
  torchvision_weights.save_state_dict(state_dict, path)
  config.model.pretrained = path
  model = models.create_model(config, C, nnx.Rngs(10))
  key = "layer4.0.conv1.weight"
  expected = state_dict[key].transpose(2, 3, 1, 0)
  for stage in (model.value_stage, model.spatial_query_stage, model.temporal_query_stage):
    np.testing.assert_array_equal(stage.blocks[0].conv1.kernel.value, expected)
  np.testing.assert_array_equal(
      model.trunk.conv1.kernel.value, state_dict["conv1.weight"].transpose(2, 3, 1, 0))
  # a file for another architecture fails with a message naming the key
  del state_dict[key]
  torchvision_weights.save_state_dict(state_dict, path)
  with pytest.raises(ValueError, match="layer4.0.conv1.weight"):
    models.create_model(config, C, nnx.Rngs(10))


def _layer4_params(cin, planes, blocks=3, expansion=4):
  """Bottleneck layer4 parameter count (convs without bias, BN scale + bias)."""
  out = planes * expansion
  one = planes * cin + 2 * planes + 9 * planes * planes + 2 * planes + planes * out + 2 * out
  first = one + cin * out + 2 * out  # + downsample
  rest = (planes * out + 2 * planes + 9 * planes * planes + 2 * planes + planes * out + 2 * out)
  return first + (blocks - 1) * rest


def test_resnet50_stmn_parameter_count_via_eval_shape():
  from stmn_jax.models.__main__ import summarize

  config = mars.get_config("stmn")
  s = summarize(config, 625)
  parts = s["parts"]
  d, m, n, length = 2048, config.model.spatial_slots, config.model.temporal_slots, 6
  layer4 = _layer4_params(1024, 512)
  for name in ("value_stage", "spatial_query_stage", "temporal_query_stage"):
    assert parts[name]["Param"] == layer4
  assert parts["spatial_memory"]["Param"] == 2 * m * d + 2 * d  # keys, values, BN scale + bias
  assert parts["temporal_memory"]["Param"] == 4 * d * (d + d) + 4 * d + n * d + n * length
  assert parts["seq_classifier"]["Param"] == 625 * d and parts["seq_neck"]["Param"] == d
  assert parts["seq_neck"]["FrozenBias"] == d
  assert s["trainable"] == sum(p["Param"] for p in parts.values())
  # official PyTorch STMN: about 89.6 M parameters
  assert abs(s["torch_equivalent"] - 89.6e6) < 0.05e6
  base = summarize(mars.get_config("baseline"), 625)
  assert base["trainable"] == s["trainable"] - 2 * layer4 - sum(
      parts[k]["Param"] for k in ("spatial_memory", "temporal_memory"))


# ------------------------------------------------------------------------------ issue 15: 5, 6
def test_every_batchnorm_follows_the_config_fields():
  """bn_running_var / bn_running_stats reach every BN of STMN, DRSA (with its attention BNs)
  and STA: backbone (XLA:CPU rewrite) and heads (stock code)."""
  for name in ("stmn", "drsa", "sta"):
    config = mars.get_config(f"{name},smoke")
    config.model.bn_running_var = "unbiased"
    config.model.bn_running_stats = "first_group"
    if name == "drsa":
      config.model.drsa.attention_bn = True
    model = nnx.eval_shape(lambda: models.create_model(config, C, nnx.Rngs(0)))
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    heads = [m for m in bns if not getattr(m, "cpu_kernel", True)]
    assert len(heads) == {"stmn": 3, "drsa": 2, "sta": 1}[name]
    for bn in bns:
      assert isinstance(bn, batch_norm.BatchNorm), name
      assert (bn.running_var, bn.running_stats) == ("unbiased", "first_group"), name


def test_bnneck_running_variance_biased_and_unbiased():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8)).astype(np.float32) * 3.0 + 1.0
  for running_var, factor in (("biased", 1.0), ("unbiased", 6 / 5)):
    neck = stmn.BNNeck(8, bn_running_var=running_var, rngs=nnx.Rngs(0))
    neck.train()
    neck(jnp.asarray(x))
    np.testing.assert_allclose(
        neck.bn.var[...], 0.9 + 0.1 * x.astype(np.float64).var(0) * factor, rtol=1e-5)


def test_default_heads_are_stock_nnx_batchnorm_bitwise():
  """With the default fields the heads' BN is Flax's code: outputs and running statistics
  identical bit for bit to an `nnx.BatchNorm` with the same variables."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 8)) * 2 + 3, jnp.float32)
  neck = stmn.BNNeck(8, rngs=nnx.Rngs(0))
  plain = nnx.BatchNorm(8, use_bias=False, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
  for m in (neck, plain):
    m.train()
  np.testing.assert_array_equal(np.asarray(neck(x)), np.asarray(plain(x)))
  np.testing.assert_array_equal(np.asarray(neck.bn.var[...]), np.asarray(plain.var[...]))
  default = mars.get_config("stmn").model
  assert (default.bn_groups, default.lstm_biases, default.bn_running_var) == (1, 1, "biased")


def _torch_official_stmn(torch, stem, planes, blocks, dim, num_classes, m, n, length):
  """The official STMN's layers (docs models.md section 1, model/network.py, resnet.py,
  memory.py) as torch modules on the meta device: counts only, nothing allocated."""
  nn = torch.nn

  def bottleneck(cin, p, stride):
    layers = [nn.Conv2d(cin, p, 1, bias=False), nn.BatchNorm2d(p),
              nn.Conv2d(p, p, 3, stride, 1, bias=False), nn.BatchNorm2d(p),
              nn.Conv2d(p, 4 * p, 1, bias=False), nn.BatchNorm2d(4 * p)]
    if stride != 1 or cin != 4 * p:
      layers += [nn.Conv2d(cin, 4 * p, 1, stride, bias=False), nn.BatchNorm2d(4 * p)]
    return layers

  def layer(cin, p, count, stride):
    mods = bottleneck(cin, p, stride)
    for _ in range(count - 1):
      mods += bottleneck(4 * p, p, 1)
    return mods

  with torch.device("meta"):
    mods = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)]
    cin = stem
    for i, (p, count) in enumerate(zip(planes[:3], blocks[:3])):
      mods += layer(cin, p, count, 1 if i == 0 else 2)
      cin = 4 * p
    for _ in range(3):  # layer4_val, layer4_key_s, layer4_key_t (last stride 1)
      mods += layer(cin, planes[3], blocks[3], 1)
    mods += [nn.BatchNorm1d(dim), nn.LSTM(dim, dim, 1), nn.BatchNorm1d(dim),
             nn.BatchNorm1d(dim), nn.Linear(dim, num_classes, bias=False),
             nn.Linear(dim, num_classes, bias=False)]  # smem BN, tmem LSTM, bn_s, bn_t, cls
    net = nn.ModuleList(mods)
    net.memory = nn.ParameterList([nn.Parameter(torch.empty(m, dim)),  # smem key, val
                                   nn.Parameter(torch.empty(m, dim)),
                                   nn.Parameter(torch.empty(n, dim)),  # tmem key, val
                                   nn.Parameter(torch.empty(n, length))])
  return net


@pytest.mark.parametrize("width", [0.25, 1.0])
def test_parameter_count_equals_the_official_pytorch_model(width):
  """With lstm_biases = 2 (and the official switches) the torch-equivalent count equals
  `sum(p.numel() for p in net.parameters())` of the official STMN (frozen BNNeck biases
  included), and the BN running means and variances equal the torch BN buffers but the
  `num_batches_tracked` scalars (one per BN). Width 1 is the released model; 0.25 shows the
  arithmetic holds for every channel count."""
  torch = pytest.importorskip("torch")
  from stmn_jax.models.__main__ import summarize

  config = mars.get_config("stmn")
  config.model.update(stem_relu=False, smem_layout="nchw_flat", memory_similarity="code",
                      lstm_biases=2, width=width)
  s = summarize(config, 625)
  dim = resnet.stage_channels(50, width)[3]
  net = _torch_official_stmn(
      torch, resnet.stem_channels(width), resnet.stage_planes(50, width), (3, 4, 6, 3), dim,
      625, config.model.spatial_slots, config.model.temporal_slots, config.data.seq_len)
  torch_params = sum(p.numel() for p in net.parameters())
  assert s["torch_equivalent"] == torch_params
  assert s["trainable"] == torch_params - 2 * dim  # all but bn_s / bn_t's frozen biases
  bns = [mod for mod in net.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
  running = sum(b.running_mean.numel() + b.running_var.numel() for b in bns)
  batch_stats = sum(p.get("BatchStat", 0) for p in s["parts"].values())
  assert batch_stats == running
  assert sum(b.numel() for b in net.buffers()) == running + len(bns)
  if width == 1.0:
    one_bias = summarize(mars.get_config("stmn"), 625)
    assert one_bias["torch_equivalent"] == torch_params  # the 2nd bias counted in either case
    assert one_bias["trainable"] == s["trainable"] - 4 * dim
