"""The `official` config word (issue 15): the authors' released run, field by field.

Config level: every field of `common.OFFICIAL_FIELDS` is set for every dataset config and STMN
preset, with and without `smoke`; DRSA and STA are refused; the paper default is untouched; the
sizes the word leaves alone are train.sh's; the epochs scored are main.py's loop; the model's
parameter count is the official model's. End to end (in-process through `stmn_jax.app.run`):
`configs/synthetic.py:stmn,official,smoke`, and `configs/mars.py:stmn,official` on a MARS layout
written by the synthetic generator at the smoke's size. The two runs have the same shapes and
optimiser, and the module shares one persistent compilation cache, so the second run reuses the
first one's compiled train step and embedding (whichever runs first; each passes alone).
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import pytest

from configs import common, mars, synthetic
from stmn_jax import app
from stmn_jax import selection

DATASET_CONFIGS = ["mars", "dukev", "lsvid", "ilidsvid", "prid2011", "synthetic"]
STMN_PRESETS = [w for w, p in common.MODEL_PRESETS.items() if p["name"] == "stmn"]


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _assert_official(config) -> None:
  for dotted, value in common.OFFICIAL_FIELDS.items():
    assert _get(config, dotted) == value, dotted
  every = config.train.eval_every_epochs
  assert config.train.eval_epoch_offset == common.OFFICIAL_EVAL_LAG % every


# ------------------------------------------------------------------------------ config level
@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_official_word_sets_every_field_for_every_dataset_and_stmn_preset(name):
  module = importlib.import_module(f"configs.{name}")
  for preset in STMN_PRESETS:
    for words in (f"{preset},official", f"official,{preset},smoke"):
      config = module.get_config(words)
      _assert_official(config)
      assert config.model.preset == preset and config.dataset.name == name
      selection.check(config)  # the selection fields agree with each other
    # `smoke` keeps its sizes under `official`; `official` wins over a smoke hold-out.
    smoke = module.get_config(f"{preset},smoke")
    both = module.get_config(f"{preset},smoke,official")
    for dotted in ("model.depth", "model.width", "data.height", "data.seq_len",
                   "data.num_ids_per_batch", "optim.num_epochs", "optim.steps_per_epoch",
                   "optim.learning_rate", "train.eval_every_epochs"):
      assert _get(both, dotted) == _get(smoke, dotted), dotted
    assert both.dataset.num_val_ids == 0


def test_official_refuses_drsa_and_sta_and_keeps_the_paper_default():
  for model in ("drsa", "sta"):
    with pytest.raises(ValueError, match=rf"'official' reproduces the released STMN code .*"
                       rf"got '{model}'.*no official run"):
      mars.get_config(f"{model},official")
  paper = mars.get_config("stmn")
  # Every official value but the erasing bound (the paper's and the code's) differs from the
  # paper default, which the word leaves alone.
  same = {dotted for dotted, value in common.OFFICIAL_FIELDS.items()
          if _get(paper, dotted) == value}
  assert same == {"data.erasing_aspect"}
  assert (paper.dataset.num_val_ids, paper.train.select_on) == (125, "val")
  assert (paper.train.eval_epoch_offset, paper.train.eval_at_end) == (0, True)
  assert common.parse_arg("baseline,official,smoke") == ("baseline", {"official", "smoke"})


def test_official_sizes_are_train_sh():
  """What the word leaves to the defaults is what train.sh / parser.py / main.py set."""
  c = mars.get_config("stmn,official")
  assert (c.data.num_ids_per_batch, c.data.num_tracklets_per_id, c.data.seq_len) == (8, 4, 6)
  assert (c.data.height, c.data.width) == (256, 128)
  assert (c.optim.learning_rate, c.optim.b1, c.optim.b2, c.optim.weight_decay) == (
      1e-4, 0.9, 0.999, 1e-5)
  assert (c.optim.decay_every_epochs, c.optim.decay_factor, c.optim.num_epochs) == (50, 0.1, 200)
  # An epoch visits every id once in batches of 8 ids, drop_last: 625 // 8 = 78 steps.
  from stmn_jax import run_setup  # pylint: disable=g-import-not-at-top

  assert c.optim.steps_per_epoch == -1 and run_setup.num_steps_per_epoch(c, 625) == 78
  assert (c.model.depth, c.model.last_stride, c.model.spatial_slots, c.model.temporal_slots) == (
      50, 1, 10, 5)
  assert (c.loss.ce_weight, c.loss.label_smoothing, c.loss.triplet_weight) == (1.0, 0.0, 1.0)
  assert c.loss.triplet_margin <= 0  # soft margin: TripletLoss('soft', batch_hard=True)
  assert (c.loss.spread_weight, c.loss.spread_margin) == (1.0, 0.3)  # --smem/tmem_margin 0.3
  assert (c.data.flip_prob, c.data.erasing_prob, tuple(c.data.erasing_area)) == (
      0.5, 0.5, (0.02, 0.4))
  # The final test is test.sh's: all frames, interleaved clips, flip averaged, cosine.
  assert (c.eval.sampling, c.eval.clips, c.eval.flip, c.eval.distance) == (
      "all_frames", "interleaved", True, "cosine")
  assert c.train.eval_every_epochs == 10  # --eval_freq 10


def _main_py_scored_epochs(n_epochs: int, eval_freq: int) -> list[int]:
  """Completed epochs whose weights main.py scores: test_rrs runs at the top of
  `for epoch in range(1, n_epochs + 1)` when (epoch + 1) % eval_freq == 0, before that epoch
  trains, i.e. after epoch - 1 completed epochs (0: the untrained weights)."""
  return [epoch - 1 for epoch in range(1, n_epochs + 1) if (epoch + 1) % eval_freq == 0]


@pytest.mark.parametrize("every,epochs", [(10, 200), (10, 37), (5, 50), (3, 2), (7, 30)])
def test_official_epochs_scored_are_main_py_loop(every, epochs):
  config = mars.get_config("stmn,official")
  config.train.eval_every_epochs, config.optim.num_epochs = every, epochs  # as command-line flags
  expected = [e for e in _main_py_scored_epochs(epochs, every) if e > 0]  # no step-0 evaluation
  assert selection.eval_epochs(config) == expected
  if (every, epochs) == (10, 200):
    assert expected == list(range(8, 199, 10))  # 8, 18, ..., 198: never 199 or 200
  config.train.eval_epoch_offset = 1  # an explicit override wins over the word's reference
  config.train.eval_every_epochs = 4
  assert config.train.eval_epoch_offset == 1


def _official_stmn_param_count(num_classes: int, dim: int = 2048, m: int = 10, n: int = 5,
                               length: int = 6) -> int:
  """`sum(p.numel() for p in net.parameters())` of the released STMN (model/network.py,
  resnet.py, memory.py), by hand: torchvision ResNet-50 without fc, layer4 three times (last
  stride 1), spatial memory (key, val, BN), temporal memory (key, val, nn.LSTM with W_ih, W_hh,
  b_ih, b_hh), bn_s and bn_t (weight and the frozen bias), cls_s and cls_t without bias."""
  def bottleneck(cin, p, down):
    convs = cin * p + 9 * p * p + p * 4 * p + (cin * 4 * p if down else 0)
    return convs + 2 * (p + p + 4 * p + (4 * p if down else 0))  # BN weight + bias

  def layer(cin, p, blocks):
    return bottleneck(cin, p, True) + (blocks - 1) * bottleneck(4 * p, p, False)

  stem = 3 * 64 * 7 * 7 + 2 * 64
  trunk = stem + layer(64, 64, 3) + layer(256, 128, 4) + layer(512, 256, 6)
  layer4 = layer(1024, 512, 3)
  assert trunk + layer4 + 2048 * 1000 + 1000 == 25_557_032  # torchvision's resnet50 count
  smem = 2 * m * dim + 2 * dim
  tmem = n * dim + n * length + 4 * dim * (dim + dim) + 2 * 4 * dim
  heads = 2 * (2 * dim) + 2 * num_classes * dim
  return trunk + 3 * layer4 + smem + tmem + heads


def test_official_parameter_count_is_the_official_models():
  """configs/mars.py:stmn,official built abstractly (nnx.eval_shape, no weights file) holds as
  many parameters as the released model with C = 625: the LSTM's two biases are real
  parameters (not added by arithmetic), the frozen BNNeck biases counted as torch does."""
  from stmn_jax.models.__main__ import summarize  # pylint: disable=g-import-not-at-top

  official = _official_stmn_param_count(625)
  assert official == 89_631_838  # docs/FAITHFULNESS.md row 5
  s = summarize(mars.get_config("stmn,official"), 625)
  frozen = sum(p.get("FrozenBias", 0) for p in s["parts"].values())
  assert s["trainable"] + frozen == official
  assert s["torch_equivalent"] == official
  assert s["parts"]["temporal_memory"]["Param"] == 5 * 2048 + 5 * 6 + 8 * 2048 * 2048 + 8 * 2048


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def shared_compiles(tmp_path_factory):
  """XLA without most optimisations (as `fast_compiles`) and a persistent compilation cache in
  a folder of this module, both restored afterwards (so other modules see no cache)."""
  from jax.experimental.compilation_cache import (  # pylint: disable=g-import-not-at-top
      compilation_cache)

  names = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {k: jax.config.values[k] for k in names}
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def _run(config, workdir) -> dict:
  _assert_official(config)  # the overrides below left every official field alone
  summary = app.run(config, str(workdir), "train")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == results["total_steps"] == summary["total_steps"]
  return results


def _check_selection(results: dict, config, num_train_ids: int) -> None:
  """results.json names the official selection, and the tested checkpoint is its choice."""
  spe = results["steps_per_epoch"]
  epochs = selection.eval_epochs(config)
  assert results["selection"] == "test" and results["num_classes"] == num_train_ids
  chosen = results["model_selection"]
  assert {k: chosen[k] for k in ("split", "num_val_ids", "metric", "ties", "sampling", "flip",
                                 "eval_at_end")} == {
      "split": "test", "num_val_ids": 0, "metric": "R1", "ties": "last", "sampling": "rrs",
      "flip": False, "eval_at_end": False}
  assert chosen["eval_epochs"] == epochs and chosen["eval_steps"] == [e * spe for e in epochs]
  assert [h["step"] for h in results["history"]] == chosen["eval_steps"]
  scores = [h["test"]["R1"] for h in results["history"]]
  best = max(i for i, s in enumerate(scores) if s == max(scores))  # ties: the later one (>=)
  step = results["history"][best]["step"]
  assert results["test_checkpoint"] == f"best by test R1 (step {step})"
  assert 0.0 < results["test"]["mAP"] <= 1.0 and results["test"]["num_valid_queries"] > 0
  assert "official-code habit" in results["note"]


@pytest.mark.slow
def test_synthetic_official_smoke_end_to_end(tmp_path, shared_compiles):
  """configs/synthetic.py:stmn,official,smoke, only the data folder moved and one step per
  epoch (2 steps; time): every id trains, R1 on the test set after epochs 1 and 2."""
  del shared_compiles
  config = synthetic.get_config("stmn,official,smoke")
  config.dataset.root = str(tmp_path / "data")
  config.optim.steps_per_epoch = 1
  assert selection.eval_epochs(config) == [1, 2]  # an interval of 1 (smoke) scores every epoch
  results = _run(config, tmp_path / "work")
  _check_selection(results, config, config.dataset.synthetic.num_train_ids)


@pytest.mark.slow
def test_mars_official_end_to_end_on_a_synthetic_mars_layout(tmp_path, shared_compiles):
  """configs/mars.py:stmn,official on a MARS tree (bbox_train/, bbox_test/, info/*.mat) written
  by the synthetic generator, read by the MARS reader; tiny sizes by overrides (those of the
  synthetic smoke run, its learning rate included, so both tests compile the same programs)
  and an evaluation interval of 3 for 2 epochs: main.py's loop scores epoch 1 only (before
  epoch 2 trains), never the last."""
  del shared_compiles
  from data_pipelines.synthetic import generator  # pylint: disable=g-import-not-at-top

  smoke = synthetic.get_config("smoke")
  knobs = dict(smoke.dataset.synthetic.to_dict(), layout="mars")
  root = str(tmp_path / "MARS")
  generator.generate(root, **knobs)
  assert sorted(os.listdir(os.path.join(root, "info"))) == [
      "query_IDX.mat", "test_name.txt", "tracks_test_info.mat", "tracks_train_info.mat",
      "train_name.txt"]

  config = mars.get_config("stmn,official")
  assert config.dataset.name == "mars" and config.dataset.protocol == "official"
  overrides = {
      "dataset.root": root, "model.depth": 18, "model.width": smoke.model.width,
      "model.spatial_slots": smoke.model.spatial_slots,
      "model.temporal_slots": smoke.model.temporal_slots, "data.height": 64, "data.width": 32,
      "data.seq_len": 4, "data.num_ids_per_batch": 4, "data.num_tracklets_per_id": 2,
      "data.eval_batch_size": smoke.data.eval_batch_size, "data.shuffle_buffer": 16,
      "optim.learning_rate": smoke.optim.learning_rate, "optim.num_epochs": 2,
      "optim.steps_per_epoch": 1, "optim.decay_every_epochs": 1, "train.log_every_steps": 1,
      "train.eval_every_epochs": 3,
  }
  for dotted, value in overrides.items():
    common.set_field(config, dotted, value)
  assert config.model.pretrained == "" and config.train.eval_epoch_offset == 2
  assert selection.eval_epochs(config) == [1]
  results = _run(config, tmp_path / "work")
  _check_selection(results, config, knobs["num_train_ids"])
