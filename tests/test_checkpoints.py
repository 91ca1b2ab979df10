"""Orbax checkpoints: round trip, best-by-mAP, selection state, tmp folders, failed saves,
kill-and-resume equivalence, NaN stop."""

import errno
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity
from PIL import Image

from data_pipelines import pipeline
from data_pipelines.tracklets import Split, Tracklet
from stmn_jax import checkpoints
from stmn_jax import sharding
from stmn_jax import train
from stmn_jax import train_state
from tests import engine_stubs as stubs

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _pure(state):
  return jax.device_get(nnx.to_pure_dict(state.model_state))


def _assert_trees_close(a, b, atol=0.0):
  ja, jb = jax.tree.structure(a), jax.tree.structure(b)
  assert ja == jb
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


def _trained_state(mesh, seed=0, steps=1):
  config = stubs.tiny_config()
  config.seed = seed
  state, lr_fn = train_state.create_train_state(config, 4, 3, mesh, stubs.tiny_model_fn)
  step_fn = train_state.make_train_step(state, config, mesh, lr_fn, stubs.tiny_loss_fn)
  for i in range(steps):
    train_state.train_step(state, step_fn, sharding.global_batch(stubs.random_batch(i), mesh))
  return state


def test_round_trip_and_best(tmp_path):
  mesh = sharding.make_mesh()
  saved = _trained_state(mesh, seed=0, steps=1)
  other, _ = train_state.create_train_state(stubs.tiny_config(), 4, 3, mesh, stubs.tiny_model_fn)
  other.rng = jax.device_put(jax.random.PRNGKey(99), sharding.replicated(mesh))
  assert not np.allclose(_pure(other)["proj"]["kernel"], _pure(saved)["proj"]["kernel"]) or \
      other.step != saved.step
  with checkpoints.Checkpointer(str(tmp_path), keep=2) as ck:
    assert ck.latest_step() is None
    ck.save(saved.step, saved.checkpoint_tree())
    ck.wait()
    assert ck.latest_step() == 1
    other.load_checkpoint_tree(ck.restore(other.checkpoint_tree()))
  assert other.step == 1
  _assert_trees_close(_pure(other), _pure(saved))
  _assert_trees_close(jax.device_get(nnx.to_pure_dict(other.opt_state)),
                      jax.device_get(nnx.to_pure_dict(saved.opt_state)))
  np.testing.assert_array_equal(np.asarray(other.rng), np.asarray(saved.rng))
  # The restored arrays keep the replicated sharding of the target.
  leaf = jax.tree.leaves(other.model_state)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4

  # `best/` keeps one checkpoint, the one the caller (the selection rule) named last.
  with checkpoints.Checkpointer(str(tmp_path), keep=2) as ck:
    tree = saved.checkpoint_tree()
    ck.save_best(5, tree, {"mAP": 0.3, "rank1": 0.5})
    ck.save_best(7, tree, {"mAP": 0.4})
    ck.wait()
    assert ck.best_step() == 7
    assert ck.best_metrics()["mAP"] == pytest.approx(0.4)
    assert sorted(os.listdir(ck.best_dir)) == ["7"]

  # A failed delete of the older step is logged; the new best stands and nothing is raised.
  with checkpoints.Checkpointer(str(tmp_path), keep=2) as ck:
    def failing_delete(step):
      raise OSError(f"permission denied deleting step {step}")
    ck._best.delete = failing_delete  # pylint: disable=protected-access
    ck.save_best(9, tree, {"mAP": 0.5})
    ck.wait()
    assert ck.best_step() == 9 and ck.best_metrics()["mAP"] == pytest.approx(0.5)
  assert sorted(os.listdir(tmp_path / "best")) == ["7", "9"]


def test_keep_last_n_and_refuse_non_finite(tmp_path):
  mesh = sharding.make_mesh()
  state = _trained_state(mesh, steps=0)
  with checkpoints.Checkpointer(str(tmp_path), keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, state.checkpoint_tree())
    ck.wait()
    assert ck._latest.all_steps() == [2, 3]  # pylint: disable=protected-access
    bad = state.checkpoint_tree()
    bad["model"]["proj"]["kernel"] = bad["model"]["proj"]["kernel"] * jnp.nan
    with pytest.raises(FloatingPointError, match="non-finite state at step 4"):
      ck.save(4, bad)
    assert ck.latest_step() == 3
  with pytest.raises(FileNotFoundError, match="no best checkpoint in .*best"):
    checkpoints.Checkpointer(str(tmp_path)).restore(state.checkpoint_tree(), "best")


def test_selection_state_is_saved_with_the_state_and_tmp_folders_are_ignored(tmp_path):
  mesh = sharding.make_mesh()
  state = _trained_state(mesh, steps=1)
  sel = checkpoints.SelectionState(
      history=[{"step": 1, "val": {"mAP": 0.5, "cmc": [0.5, 1.0]}}], best_step=1,
      best_metrics={"mAP": 0.5}, loss_history=[(1, 2.5)], train={"loss": 2.5})
  # An unfinished save of a killed run, in both folders.
  for d in ("checkpoints", "best"):
    os.makedirs(tmp_path / d / "7.orbax-checkpoint-tmp-1234" / "default")
  with checkpoints.Checkpointer(str(tmp_path), read_only=True) as ck:
    assert ck.latest_step() is None and ck.best_step() is None  # never listed as steps
  with checkpoints.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state.checkpoint_tree(), sel)
    ck.save(2, state.checkpoint_tree())  # no selection state: as an older version wrote it
    ck.save_best(1, state.checkpoint_tree(), {"mAP": 0.5, "cmc": np.ones(2)})
    ck.wait()
    assert ck.restore_selection(1) == sel
    assert ck.restore_selection(2) is None
    assert ck.best_metrics() == {"mAP": 0.5}
    assert int(ck.restore(state.checkpoint_tree(), "latest", step=1)["step"]) == 1
  # A writable Checkpointer deletes the tmp folders (before its first save).
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert os.listdir(tmp_path / "best") == ["1"]
  with checkpoints.Checkpointer(str(tmp_path)) as ck:
    legacy = ck.legacy_selection(2)
  assert (legacy.known, legacy.best_step, legacy.history) == (False, 1, [])


def test_check_for_errors_does_not_block_and_reports_a_failed_save(tmp_path, monkeypatch):
  mesh = sharding.make_mesh()
  state = _trained_state(mesh, steps=0)
  release = threading.Event()
  real = atomicity.on_commit_callback

  async def slow_then_full(tmp_dir, *args, **kwargs):
    release.wait(30)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_dir.get()))

  monkeypatch.setattr(atomicity, "on_commit_callback", slow_then_full)
  ck = checkpoints.Checkpointer(str(tmp_path))
  ck.save(3, state.checkpoint_tree())
  ck.check_for_errors()  # in flight: returns at once
  release.set()
  with pytest.raises(checkpoints.CheckpointError) as info:
    for _ in range(300):
      ck.check_for_errors()
      time.sleep(0.05)
  assert str(info.value) == (
      f"saving the latest checkpoint of step 3 to {tmp_path}/checkpoints/3 failed: "
      f"[Errno 28] No space left on device: {info.value.__cause__.filename}")
  assert ".orbax-checkpoint-tmp" in info.value.__cause__.filename
  ck.check_for_errors()  # reported once
  monkeypatch.setattr(atomicity, "on_commit_callback", real)
  ck.close()
  assert checkpoints.Checkpointer(str(tmp_path), read_only=True).latest_step() is None


# ------------------------------------------------------------------ whole-loop tests


def _tiny_split(root) -> Split:
  """6 identities x 2 cameras, 5 frames each, 16x8 PNGs on disk; a 2-id test part."""
  rs = np.random.RandomState(0)

  def tracklet(pid, cam, tag):
    paths = []
    for f in range(5):
      path = os.path.join(root, f"{tag}_{pid}_{cam}_{f}.png")
      base = np.full((16, 8, 3), (20 * pid + 60 * cam) % 200, np.int32)
      img = np.clip(base + rs.randint(0, 40, size=(16, 8, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(path)
      paths.append(path)
    return Tracklet(tuple(paths), pid, cam)

  train_t = tuple(tracklet(p, c, "tr") for p in range(6) for c in range(2))
  query = tuple(tracklet(p, 0, "te") for p in (10, 11))
  gallery = tuple(tracklet(p, 1, "te") for p in (10, 11))
  return Split("tiny", train_t, query, gallery)


def _loop_config():
  config = stubs.tiny_config()
  config.optim.num_epochs, config.optim.steps_per_epoch = 2, 3
  config.train.checkpoint_every_steps = 2
  config.train.log_every_steps = 1
  config.dataset.num_val_ids = 0
  config.train.select_on = "none"
  config.data.erasing_prob = 0.5  # the random augmentation must also be reproduced on resume
  return config


def test_kill_and_resume_gives_the_same_parameters(tmp_path):
  split = _tiny_split(str(tmp_path))
  config = _loop_config()
  mesh = sharding.make_mesh()
  kw = dict(model_fn=stubs.tiny_model_fn, loss_fn=stubs.tiny_loss_fn, mesh=mesh, split=split)
  # Uninterrupted: 5 steps.
  ref, ref_summary = train.train_and_evaluate(config, str(tmp_path / "a"), max_steps=5, **kw)
  assert ref.step == 5 and ref_summary["stopped_early"]
  # Killed after step 3 (last checkpoint: step 2), restarted, run to 5.
  killed, _ = train.train_and_evaluate(config, str(tmp_path / "b"), max_steps=3, **kw)
  assert killed.step == 3
  ck = checkpoints.Checkpointer(str(tmp_path / "b"))
  assert ck.latest_step() == 2
  ck.close()
  resumed, summary = train.train_and_evaluate(config, str(tmp_path / "b"), max_steps=5, **kw)
  assert resumed.step == 5
  np.testing.assert_allclose(summary["train"]["loss"], ref_summary["train"]["loss"], atol=1e-6)
  _assert_trees_close(_pure(resumed), _pure(ref), atol=1e-6)
  # Training did change the parameters (the comparison is not vacuous).
  fresh, _ = train_state.create_train_state(config, 6, 3, mesh, stubs.tiny_model_fn)
  assert np.abs(_pure(fresh)["proj"]["kernel"] - _pure(ref)["proj"]["kernel"]).max() > 1e-4


def test_nan_loss_stops_and_last_checkpoint_stays_finite(tmp_path, monkeypatch):
  split = _tiny_split(str(tmp_path))
  config = _loop_config()
  real = pipeline.train_iterator

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
      if step == 3:
        batch = dict(batch, frames=np.full_like(batch["frames"], np.nan))
      yield batch

  monkeypatch.setattr(pipeline, "train_iterator", poisoned)
  workdir = str(tmp_path / "w")
  with pytest.raises(FloatingPointError, match="non-finite .*loss.* at step 3"):
    train.train_and_evaluate(config, workdir, model_fn=stubs.tiny_model_fn,
                             loss_fn=stubs.tiny_loss_fn, split=split)
  state, _ = train_state.create_train_state(config, 6, 3, sharding.make_mesh(), stubs.tiny_model_fn)
  with checkpoints.Checkpointer(workdir) as ck:
    assert ck.latest_step() == 2  # the step-4 save never happened
    tree = ck.restore(state.checkpoint_tree())
  assert checkpoints.is_finite_tree(tree)
  assert int(tree["step"]) == 2
