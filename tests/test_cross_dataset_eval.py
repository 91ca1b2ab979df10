"""--mode=eval --eval_config: a model trained on one synthetic layout, tested on another's split.

A: the smoke synthetic benchmark (MARS layout, seed 0) and a model built for its training ids.
B: a synthetic benchmark in the DukeV layout (other seed, other ids and counts), read by the real
DukeV reader through `configs/dukev.py` with its root set in a config file of its own (the
documented way).
"""

import importlib
import json
import os
import sys

import jax
import numpy as np
import pytest
from absl import flags

import data_pipelines
from configs import dukev
from configs import synthetic
from data_pipelines import synthetic as synthetic_data
from data_pipelines import tracklets as tracklets_lib
from stmn_jax import app
from stmn_jax import checkpoints
from stmn_jax import errors
from stmn_jax import eval_mode
from stmn_jax import inference
from stmn_jax import ranking
from stmn_jax import results as results_lib
from stmn_jax import run_setup
from stmn_jax import sharding
from stmn_jax import train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("fast_compiles")

# B: another layout, seed and size than A's smoke benchmark (8 train / 4 test ids, MARS layout).
B_KNOBS = dict(layout="dukev", seed=5, height=64, width=32, num_cameras=3, num_train_ids=3,
               num_test_ids=6, min_cameras_per_id=2, max_cameras_per_id=2,
               max_tracklets_per_camera=1, min_length=2, short_max_length=6, max_length=10,
               long_fraction=0.0, num_distractor_tracklets=2, num_junk_tracklets=1)
EVAL_CONFIG_FILE = """\
from configs import dukev


def get_config(arg=None):
  config = dukev.get_config(arg)
  config.dataset.root = {root!r}
  return config
"""


def _train_config(root):
  """Smoke baseline on A; one clip per tracklet and no flip at test time (the eval config's
  defaults are all frames and flip: the embedding must follow this config, not that one)."""
  config = synthetic.get_config("baseline,smoke")
  config.dataset.root = str(root)
  config.dataset.num_val_ids = 0
  config.train.select_on = "none"  # the final weights are tested
  config.eval.sampling = "rrs"
  config.eval.flip = False
  return config


def _trained_state(config, setup):
  """A model built for A's training ids, every parameter and BN statistic moved off its init
  value: a trained model's checkpoint without the compile of a train step (the slow part of a
  run here; tests/test_main.py runs training and eval end to end)."""
  state, _ = train_state.create_train_state(config, setup.num_classes, 1, setup.mesh)
  rng = np.random.default_rng(0)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state.model_state)
  leaves = [np.asarray(x) * (1.0 + 0.5 * rng.random(x.shape, np.float32)) if "var" in str(p)
            else np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32)
            for p, x in flat]
  state.model_state = jax.device_put(jax.tree.unflatten(treedef, leaves),
                                     sharding.replicated(setup.mesh))
  return state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(training config, workdir, eval config file of B): the workdir as a run on A leaves it, a
  checkpoint (step 2) and the same-dataset results.json; B generated beside it."""
  tmp = tmp_path_factory.mktemp("cross")
  config = _train_config(tmp / "a")
  setup = run_setup.prepare_run(config)
  state = _trained_state(config, setup)
  workdir = str(tmp / "work")
  with checkpoints.Checkpointer(workdir) as ckpt:
    ckpt.save(2, state.checkpoint_tree())
    ckpt.wait()
  results_lib.write_results(workdir, {"mode": "train", "step": 2, "test": {"mAP": 0.5}})
  synthetic_data.generate(str(tmp / "b"), **B_KNOBS)
  eval_file = tmp / "eval_b.py"
  eval_file.write_text(EVAL_CONFIG_FILE.format(root=str(tmp / "b")))
  return config, workdir, str(eval_file)


def _results_bytes(workdir):
  with open(os.path.join(workdir, "results.json"), "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def b_split(trained):
  """B's split read directly through the DukeV reader (its root beside the eval config)."""
  _, _, eval_file = trained
  b_config = dukev.get_config("smoke")
  b_config.dataset.root = os.path.join(os.path.dirname(eval_file), "b")
  return b_config.dataset.root, data_pipelines.get_split(b_config.dataset)


@pytest.fixture(scope="module")
def direct(trained, b_split):
  """B's test metrics computed here: B's query and gallery embedded with the restored model
  under the training config's embedding settings, then ranked with its metric settings."""
  config, workdir, _ = trained
  split = b_split[1]
  state, _, _ = inference.restore_model(config, workdir)
  query, gallery = list(split.query), list(split.gallery)
  unique = list(dict.fromkeys(query + gallery))
  feats = inference.embed_tracklets(state, unique, config, sharding.make_mesh())
  qi = [unique.index(t) for t in query]
  gi = [unique.index(t) for t in gallery]
  q, g = tracklets_lib.arrays(query), tracklets_lib.arrays(gallery)
  e = config.eval
  return ranking.evaluate(feats[qi], feats[gi], q["pid"], g["pid"], q["camid"], g["camid"],
                          distance=e.distance, rerank=e.rerank, ap=e.ap, max_rank=e.max_rank)


def test_eval_on_another_dataset_names_both_and_keeps_results_json(trained, b_split, direct):
  config, workdir, eval_file = trained
  b_root, b_split = b_split
  before = _results_bytes(workdir)
  a_test = data_pipelines.get_split(config.dataset)
  assert (len(b_split.query), len(b_split.gallery)) != (len(a_test.query), len(a_test.gallery))

  arg = f"{eval_file}:smoke"
  summary = app.run(config, workdir, "eval", eval_config=arg)
  assert summary["train_dataset"] == "synthetic" and summary["eval_dataset"] == "dukev"
  assert summary["train_dataset_root"] == config.dataset.root
  assert summary["eval_dataset_root"] == b_root
  assert summary["eval_config"] == arg
  assert (summary["num_query"], summary["num_gallery"]) == (len(b_split.query),
                                                            len(b_split.gallery))
  assert summary["step"] == 2  # no validation ids: the latest checkpoint
  want = direct
  got = summary["test"]
  assert got["num_valid_queries"] == want["num_valid_queries"] > 0
  np.testing.assert_allclose(got["mAP"], want["mAP"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["cmc"], want["cmc"], rtol=1e-5, atol=1e-6)
  # Written beside results.json, which keeps the same-dataset results of the training run.
  path = os.path.join(workdir, "results_dukev.json")
  assert summary["results_file"] == path
  with open(path) as f:
    written = json.load(f)
  assert written["eval_dataset"] == "dukev" and written["train_dataset"] == "synthetic"
  np.testing.assert_allclose(written["test"]["mAP"], want["mAP"], rtol=1e-5, atol=1e-6)
  assert _results_bytes(workdir) == before
  assert "eval_dataset" not in json.loads(before)


def test_main_eval_config_flag(trained, direct, monkeypatch):
  """main.py's flags, parsed in this process: --eval_config reaches the eval mode."""
  config, workdir, eval_file = trained
  monkeypatch.chdir(REPO)  # main.py's default config path, loaded when its flags are defined
  main_py = importlib.import_module("main")
  if "eval_config" not in flags.FLAGS:
    main_py.define_flags()
  path = os.path.join(workdir, "results_dukev.json")
  if os.path.exists(path):
    os.remove(path)
  before = _results_bytes(workdir)
  argv = ["main.py", "--config=configs/synthetic.py:baseline,smoke",
          f"--config.dataset.root={config.dataset.root}", "--config.dataset.num_val_ids=0",
          "--config.train.select_on=none", "--config.eval.sampling=rrs",
          "--config.eval.flip=False", f"--workdir={workdir}", "--mode=eval",
          f"--eval_config={eval_file}:smoke"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  try:
    flags.FLAGS(argv)
    main_py.run()
  finally:
    flags.FLAGS.unparse_flags()
  with open(path) as f:
    written = json.load(f)
  assert (written["train_dataset"], written["eval_dataset"]) == ("synthetic", "dukev")
  assert written["eval_config"] == f"{eval_file}:smoke"
  np.testing.assert_allclose(written["test"]["mAP"], direct["mAP"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(written["test"]["cmc"], direct["cmc"], rtol=1e-5, atol=1e-6)
  assert _results_bytes(workdir) == before


def test_eval_config_fields(trained):
  config, _, eval_file = trained
  config = config.copy_and_resolve_references()
  config.data.source = "tfds"  # where A's frames were: not where B's are
  other = app.load_config_file(f"{eval_file}:sta,smoke")
  cross = eval_mode.cross_dataset_config(config, other, "eval_b.py")
  assert cross.dataset.to_dict() == dict(other.dataset.to_dict(), num_val_ids=0)
  assert cross.data.source == "files"
  assert cross.train.select_on == "none"
  for section in ("model", "eval", "loss"):
    assert cross[section].to_dict() == config[section].to_dict(), section
  assert cross.data.to_dict() == dict(config.data.to_dict(), source="files")
  assert config.dataset.name == "synthetic" and config.data.source == "tfds"  # not changed


def test_eval_config_errors_before_work(trained, tmp_path):
  config, workdir, eval_file = trained
  # configs/dukev.py without :smoke is 256x128; the model was trained at 64x32.
  with pytest.raises(errors.ConfigError, match=r"--eval_config=.*eval_b.py: input size .* "
                     r"256x128, but the model of --config was trained at 64x32"):
    app.run(config, workdir, "eval", eval_config=eval_file)
  with pytest.raises(errors.ConfigFileNotFoundError, match="no_such.py"):
    app.run(config, workdir, "eval", eval_config=str(tmp_path / "no_such.py"))
  # Both before the workdir is looked at: not the missing workdir's error.
  with pytest.raises(errors.ConfigError, match="256x128"):
    eval_mode.eval_mode(config, str(tmp_path / "no_workdir"), eval_config=eval_file)


def test_unwritable_cross_results_file_fails_before_work(trained, monkeypatch):
  """`W/results_<dataset>.json` is checked writable before the model is restored (a folder in
  its place here), as results.json is, not after the whole evaluation."""
  config, workdir, eval_file = trained
  target = os.path.join(workdir, "results_dukev.json")
  if os.path.exists(target):
    os.remove(target)
  os.makedirs(target)
  restored = []
  monkeypatch.setattr(inference, "prepare", lambda *a, **k: restored.append(1))
  try:
    with pytest.raises(errors.WorkdirNotWritableError, match="results_dukev.json"):
      eval_mode.eval_mode(config, workdir, eval_config=f"{eval_file}:smoke")
  finally:
    os.rmdir(target)
  assert not restored
