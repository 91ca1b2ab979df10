"""torchvision state-dict reading (.pth / .npz / .safetensors), key mapping, errors, CLI."""

from __future__ import annotations

import builtins
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from stmn_jax.models import resnet
from stmn_jax.models import torchvision_weights as tvw
from tests.test_resnet import TorchResNet, numpy_state_dict, randomize

DEPTH, WIDTH = 18, 0.125


@pytest.fixture(scope="module")
def torch_model():
  return randomize(TorchResNet(DEPTH, WIDTH, last_stride=1), seed=11)


@pytest.fixture(scope="module")
def state_dict(torch_model):
  return numpy_state_dict(torch_model)


def abstract_models(depth=DEPTH, width=WIDTH):
  trunk = nnx.eval_shape(lambda: resnet.ResNetTrunk(depth, width, rngs=nnx.Rngs(0)))
  stage = nnx.eval_shape(lambda: resnet.ResNetStage(depth, width, rngs=nnx.Rngs(0)))
  return trunk, stage


def assert_same_dict(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------- file formats


def test_pth_npz_safetensors_read_identically(tmp_path, torch_model, state_dict):
  from safetensors.torch import save_file

  torch.save(torch_model.state_dict(), tmp_path / "w.pth")
  np.savez(tmp_path / "w.npz", **state_dict)
  save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(tmp_path / "w.safetensors"))
  for name in ("w.pth", "w.npz", "w.safetensors"):
    loaded = tvw.load_state_dict(tmp_path / name)
    assert_same_dict(loaded, state_dict)
    assert all(isinstance(v, np.ndarray) for v in loaded.values())


def test_nested_and_module_prefix_and_half_precision(tmp_path, torch_model, state_dict):
  wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in torch_model.state_dict().items()}}
  torch.save(wrapped, tmp_path / "a.pt")
  assert_same_dict(tvw.load_state_dict(tmp_path / "a.pt"), state_dict)
  torch.save({"model": torch_model.state_dict()}, tmp_path / "b.pth")
  assert_same_dict(tvw.load_state_dict(tmp_path / "b.pth"), state_dict)
  half = {k: (v.half() if v.is_floating_point() else v) for k, v in torch_model.state_dict().items()}
  torch.save(half, tmp_path / "h.pth")
  loaded = tvw.load_state_dict(tmp_path / "h.pth")
  w = "layer1.0.conv1.weight"
  assert loaded[w].dtype == np.float32
  np.testing.assert_array_equal(loaded[w], half[w].float().numpy())
  np.savez(tmp_path / "m.npz", **{"module." + k: v for k, v in state_dict.items()})
  assert_same_dict(tvw.load_state_dict(tmp_path / "m.npz"), state_dict)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_files_are_read_without_pickle(tmp_path):
  marker = tmp_path / "executed"

  class Evil:
    def __reduce__(self):
      return (builtins.open, (str(marker), "w"))

  torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")  # torch pickles the object
  with pytest.raises(tvw.WeightLoadError, match=r"evil\.pth.*weights_only"):
    tvw.load_state_dict(tmp_path / "evil.pth")
  np.savez(tmp_path / "obj.npz", x=np.array([Evil()], dtype=object))
  with pytest.raises(tvw.WeightLoadError, match=r"obj\.npz.*pickle"):
    tvw.load_state_dict(tmp_path / "obj.npz")
  assert not marker.exists()
  # a plain pickle with a .pth name is refused too
  (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": Evil()}))
  with pytest.raises(tvw.WeightLoadError, match=r"plain\.pth"):
    tvw.load_state_dict(tmp_path / "plain.pth")
  assert not marker.exists()


def test_bad_paths_and_entries(tmp_path):
  with pytest.raises(tvw.WeightLoadError, match=r"w\.bin.*extension.*\.npz"):
    tvw.load_state_dict(tmp_path / "w.bin")
  with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
    tvw.load_state_dict(tmp_path / "missing.npz")
  torch.save({"conv1.weight": "not a tensor"}, tmp_path / "s.pth")
  with pytest.raises(tvw.WeightLoadError, match=r"s\.pth.*'conv1\.weight'.*str"):
    tvw.load_state_dict(tmp_path / "s.pth")
  (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(tvw.WeightLoadError, match=r"junk\.safetensors"):
    tvw.load_state_dict(tmp_path / "junk.safetensors")


def test_pth_without_torch_suggests_npz(tmp_path, monkeypatch, torch_model):
  torch.save(torch_model.state_dict(), tmp_path / "w.pth")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=r"w\.pth.*PyTorch.*\.npz"):
    tvw.load_state_dict(tmp_path / "w.pth")


# ---------------------------------------------------------------------------------- mapping


def test_every_variable_gets_its_torch_value(state_dict):
  trunk, stage = abstract_models()
  tvw.load_into_trunk(trunk, state_dict)
  tvw.load_into_stage(stage, state_dict)
  entries = tvw.trunk_entries(trunk) + tvw.stage_entries(stage)
  used = {k for k, _, _ in entries}
  expected = {k for k in state_dict if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  assert used == expected
  for key, var, kind in entries:
    value = np.asarray(var[...])
    ref = state_dict[key].transpose(2, 3, 1, 0) if kind == "conv" else state_dict[key]
    np.testing.assert_array_equal(value, ref, err_msg=key)
  # direct spot checks of the layout
  np.testing.assert_array_equal(np.asarray(trunk.conv1.kernel[...])[1, 2, 0, 5], state_dict["conv1.weight"][5, 0, 1, 2])
  np.testing.assert_array_equal(np.asarray(stage.blocks[0].downsample_bn.var[...]),
                                state_dict["layer4.0.downsample.1.running_var"])
  n_vars = len(jax.tree.leaves(nnx.state((trunk, stage))))
  assert n_vars == len(entries)


def test_load_into_a_concrete_model_and_other_prefix(state_dict):
  stage = resnet.ResNetStage(DEPTH, WIDTH, rngs=nnx.Rngs(0))
  renamed = {"base.layer4_key." + k[len("layer4."):]: v for k, v in state_dict.items() if k.startswith("layer4.")}
  tvw.load_into_stage(stage, renamed, prefix="base.layer4_key")
  np.testing.assert_array_equal(np.asarray(stage.blocks[1].conv2.kernel[...]),
                                state_dict["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
  trunk = resnet.ResNetTrunk(DEPTH, WIDTH, rngs=nnx.Rngs(0))
  tvw.load_into_trunk(trunk, {"backbone." + k: v for k, v in state_dict.items()}, prefix="backbone.")
  np.testing.assert_array_equal(np.asarray(trunk.bn1.mean[...]), state_dict["bn1.running_mean"])
  assert trunk.bn1.mean[...].dtype == jnp.float32


def test_missing_key_error_names_it(state_dict):
  trunk, stage = abstract_models()
  sd = dict(state_dict)
  del sd["layer2.1.bn2.running_var"]
  with pytest.raises(tvw.WeightLoadError, match=r"missing key 'layer2\.1\.bn2\.running_var'"):
    tvw.load_into_trunk(trunk, sd)
  with pytest.raises(tvw.WeightLoadError, match=r"missing key 'layer4\.0\.conv1\.weight'"):
    tvw.load_into_stage(stage, {k: v for k, v in sd.items() if not k.startswith("layer4.0.conv1")})


def test_shape_mismatch_error_names_key_and_shapes(state_dict):
  stage = resnet.ResNetStage(DEPTH, WIDTH, rngs=nnx.Rngs(0))
  before = np.asarray(stage.blocks[0].conv1.kernel[...]).copy()
  sd = dict(state_dict)
  sd["layer4.1.conv2.weight"] = np.zeros((64, 64, 1, 3), np.float32)
  with pytest.raises(tvw.WeightLoadError, match=r"'layer4\.1\.conv2\.weight': expected shape \(64, 64, 3, 3\), found \(64, 64, 1, 3\)"):
    tvw.load_into_stage(stage, sd)
  # nothing was assigned on failure
  np.testing.assert_array_equal(np.asarray(stage.blocks[0].conv1.kernel[...]), before)
  # ResNet-50 weights into a ResNet-18 trunk: reported as mismatches / unexpected keys
  sd50 = numpy_state_dict(TorchResNet(50, WIDTH))
  trunk, _ = abstract_models()
  with pytest.raises(tvw.WeightLoadError, match=r"layer1\.0\.conv1\.weight': expected shape \(8, 8, 3, 3\), found \(8, 8, 1, 1\)"):
    tvw.load_into_trunk(trunk, sd50)


def test_unexpected_keys_under_loaded_prefixes(state_dict):
  trunk, stage = abstract_models()
  sd = dict(state_dict)
  sd["layer3.2.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)  # a block ResNet-18 lacks
  sd["fc.extra"] = np.zeros(3, np.float32)  # fc.* is ignored
  sd["classifier.weight"] = np.zeros(3, np.float32)  # outside the loaded prefixes
  with pytest.raises(tvw.WeightLoadError, match=r"unexpected key 'layer3\.2\.conv1\.weight'"):
    tvw.load_into_trunk(trunk, sd)
  tvw.load_into_trunk(trunk, sd, strict=False)
  tvw.load_into_stage(stage, sd)  # layer3 is not under the stage's prefix
  sd["layer4.0.conv9.weight"] = np.zeros(1, np.float32)
  with pytest.raises(tvw.WeightLoadError, match=r"unexpected key 'layer4\.0\.conv9\.weight'"):
    tvw.load_into_stage(stage, sd)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_converts_pth_to_npz_and_safetensors(tmp_path, torch_model, state_dict, capsys):
  torch.save({"state_dict": torch_model.state_dict()}, tmp_path / "w.pth")
  assert tvw.main([f"--src={tmp_path / 'w.pth'}", f"--dst={tmp_path / 'w.npz'}"]) == 0
  assert "w.npz" in capsys.readouterr().out
  with np.load(tmp_path / "w.npz", allow_pickle=False) as f:
    assert_same_dict({k: f[k] for k in f.files}, state_dict)
  assert tvw.main(["--src", str(tmp_path / "w.npz"), "--dst", str(tmp_path / "w.safetensors")]) == 0
  assert_same_dict(tvw.load_state_dict(tmp_path / "w.safetensors"), state_dict)
  with pytest.raises(tvw.WeightLoadError, match=r"out\.pth.*\.npz or \.safetensors"):
    tvw.main([f"--src={tmp_path / 'w.npz'}", f"--dst={tmp_path / 'out.pth'}"])
