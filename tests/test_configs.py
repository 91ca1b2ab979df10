"""Config files: the words after the colon, presets and errors."""

import importlib

import pytest

from configs import common

DATASET_CONFIGS = ["mars", "dukev", "lsvid", "ilidsvid", "prid2011", "synthetic"]


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_every_dataset_config_builds_with_every_model(name):
  module = importlib.import_module(f"configs.{name}")
  for model in common.MODEL_PRESETS:
    config = module.get_config(f"{model},smoke")
    assert config.model.preset == model
    assert config.dataset.name == name
    assert config.model.depth == 18  # smoke shrinks the backbone


def test_default_is_the_paper_setting():
  config = importlib.import_module("configs.mars").get_config(None)
  assert config.model.name == "stmn"
  assert (config.model.spatial_slots, config.model.temporal_slots) == (10, 5)
  assert config.loss.spread_margin == 0.3
  assert (config.optim.learning_rate, config.optim.weight_decay) == (1e-4, 1e-5)
  assert (config.data.num_ids_per_batch, config.data.num_tracklets_per_id) == (8, 4)
  assert (config.data.height, config.data.width, config.data.seq_len) == (256, 128, 6)
  assert config.optim.num_epochs == 200 and config.optim.decay_every_epochs == 50


@pytest.mark.parametrize(
    "word,sm,tm,spread",
    [
        ("baseline", False, False, 0.0),
        ("sm", True, False, 1.0),
        ("sm_nospread", True, False, 0.0),
        ("tm", False, True, 1.0),
        ("tm_nospread", False, True, 0.0),
        ("stmn_nospread", True, True, 0.0),
        ("stmn", True, True, 1.0),
    ],
)
def test_ablation_presets(word, sm, tm, spread):
  config = importlib.import_module("configs.mars").get_config(word)
  assert (config.model.spatial_memory, config.model.temporal_memory) == (sm, tm)
  assert config.loss.spread_weight == spread


def test_unknown_word_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown config word 'stnm'"):
    common.parse_arg("stnm")
  with pytest.raises(ValueError, match="more than one model"):
    common.parse_arg("sta,drsa")
