"""The main job's shipped pretrained trunk (configs/pretrained/synthetic_trunk.npz, issue 17):
the file is the one its record describes, made by the documented default command, loads without
pickle into every main-job model, and was trained on identities the main job never sees."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from benchmarks import pretrain_trunk
from configs import common
from configs import synthetic
from stmn_jax import models
from stmn_jax.models import resnet
from stmn_jax.models import torchvision_weights

TRUNK = synthetic.MAIN_JOB_TRUNK


def _record():
  with open(pretrain_trunk.record_path(TRUNK)) as f:
    return json.load(f)


def test_shipped_trunk_is_the_recorded_file_of_the_default_command():
  rec = _record()
  assert rec["sha256"] == pretrain_trunk.sha256(TRUNK)
  assert rec["bytes"] == os.path.getsize(TRUNK)
  # Made by `python -m benchmarks.pretrain_trunk` with its defaults (the README's command).
  assert rec["command"] == "python -m benchmarks.pretrain_trunk"
  assert rec["recipe"] == pretrain_trunk.recipe(pretrain_trunk.parse([]))
  # The pretraining learned its own benchmark (a sanity check of the trunk, not the main job).
  assert rec["pretrain_test"]["mAP"] > 0.8
  with np.load(TRUNK, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
          "layer4.1.bn2.weight"} <= set(arrays)
  assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrays.values())


def test_main_job_points_at_the_trunk_and_smoke_and_ablation_do_not():
  assert synthetic.get_config().model.pretrained == TRUNK
  assert synthetic.get_config("smoke").model.pretrained == ""
  assert synthetic.get_config("stmn,ablation").model.pretrained == ""


@pytest.mark.parametrize("preset", sorted(common.MODEL_PRESETS))
def test_every_main_job_model_loads_the_trunk(preset):
  config = synthetic.get_config(preset)
  model = models.create_model(config, 52, nnx.Rngs(0))
  state_dict = torchvision_weights.load_state_dict(TRUNK)
  parts = [torchvision_weights.trunk_entries(m) for _, m in nnx.iter_modules(model)
           if isinstance(m, resnet.ResNetTrunk)]
  assert parts, preset
  stages = [torchvision_weights.stage_entries(m, "layer4") for _, m in nnx.iter_modules(model)
            if isinstance(m, resnet.ResNetStage)]  # layer4 and each of its copies (STMN: 3)
  assert stages, preset
  for entries in parts + stages:
    assert len(entries) > 10
    for key, variable, kind in entries:
      value = np.asarray(variable.get_value())
      if kind == "conv":
        value = value.transpose(3, 2, 0, 1)
      np.testing.assert_array_equal(value, state_dict[key], err_msg=f"{preset}: {key}")


def test_pretraining_identities_are_disjoint_from_the_main_jobs(tmp_path):
  a = pretrain_trunk.parse([])
  config, main_knobs = pretrain_trunk.pretrain_config(a, str(tmp_path))
  assert main_knobs == synthetic.get_config().dataset.synthetic.to_dict()
  knobs = config.dataset.synthetic
  assert (knobs.seed, knobs.num_train_ids, knobs.num_distractor_tracklets,
          knobs.clutter_strength, knobs.occlusion_prob) == (1, 300, 0, 0.0, 0.0)
  assert config.model.pretrained == "" and config.model.width == 0.25
  n = pretrain_trunk.check_disjoint(knobs.to_dict(), main_knobs)
  assert n == 300 + 10 + main_knobs["num_train_ids"] + main_knobs["num_test_ids"]
  # The check can fail: the main job's own generator seed repeats its identities.
  same = pretrain_trunk.pretrain_knobs(main_knobs, pretrain_trunk.parse(["--data_seed=0"]))
  with pytest.raises(ValueError, match="main job's benchmark.* share "):
    pretrain_trunk.check_disjoint(same, main_knobs)


def test_the_command_writes_a_loadable_trunk_and_its_record(tmp_path):
  out = tmp_path / "trunk.npz"
  argv = ["--steps=2", "--ids=8", "--test_ids=2", f"--out={out}",
          f"--workdir={tmp_path / 'work'}"]
  assert pretrain_trunk.main(argv) == 0
  rec = json.loads((tmp_path / "trunk.json").read_text())
  assert rec["sha256"] == pretrain_trunk.sha256(str(out))
  assert rec["recipe"]["steps"] == 2 and rec["command"].endswith(" ".join(argv))
  config = synthetic.get_config("stmn")
  config.model.pretrained = str(out)
  model = models.create_model(config, 8, nnx.Rngs(1))
  assert models.load_pretrained(model, str(out)) == 4  # trunk + STMN's three layer4 stages


def test_steps_must_be_whole_epochs():
  with pytest.raises(SystemExit):
    pretrain_trunk.parse(["--steps=620"])
  assert pretrain_trunk.parse(["--steps=30"]).steps == 30
  assert pretrain_trunk.DEFAULT_OUT == TRUNK


def test_a_trunk_that_does_not_fit_is_a_config_error_naming_the_field(tmp_path):
  """A user who widens the main job's model (or points at a missing file) gets one clear
  ConfigError naming config.model.pretrained (main.py prints it without a traceback)."""
  from stmn_jax import errors  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config("stmn")
  config.model.width = 0.5
  with pytest.raises(errors.ConfigError, match=r"(?s)config\.model\.pretrained=.*synthetic_trunk"
                     r"\.npz' does not fit.*expected shape.*--config\.model\.pretrained="):
    models.create_model(config, 8, nnx.Rngs(0))
  config = synthetic.get_config("stmn")
  config.model.pretrained = str(tmp_path / "missing.npz")
  with pytest.raises(errors.ConfigError, match=r"config\.model\.pretrained=.*missing\.npz.*not "
                     r"found"):
    models.create_model(config, 8, nnx.Rngs(0))
  assert issubclass(errors.ConfigError, errors.USER_ERRORS)


def test_a_model_without_a_resnet_backbone_is_a_config_error():
  from stmn_jax import errors  # pylint: disable=g-import-not-at-top

  with pytest.raises(errors.ConfigError, match=r"config\.model\.pretrained=.*no ResNet trunk"):
    models.load_pretrained(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), TRUNK)
