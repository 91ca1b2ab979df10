"""Workdirs in a bucket (`gs://...`), offline, through the fake Cloud Storage of `tests/cloud_fs.py`.

There `gs://` paths reach a local folder through `etils.epath` only (os-level access to a
`gs://` string fails), so each test proves that the code under test read and wrote the workdir
through epath: the lock object, results.json, extracted features, figures, visrank folders.
"""

from __future__ import annotations

import json
import os
import socket
import time
import types

import numpy as np
import pytest

from stmn_jax import errors
from stmn_jax import features_io
from stmn_jax import figures
from stmn_jax import results as results_lib
from stmn_jax import visrank
from stmn_jax import workdir_io
from stmn_jax import workdir_lock
from tests import cloud_fs

W = "gs://bucket/runs/w"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  with cloud_fs.fake_gcs(tmp_path / "gcs", tmp_path / "cwd", monkeypatch) as fs:
    yield fs


def _local(fs, *parts):
  return os.path.join(fs.local(W), *parts)


def test_the_fake_bucket_is_reached_through_epath_only(gcs):
  from etils import epath  # pylint: disable=g-import-not-at-top

  (epath.Path(W) / "a").mkdir(parents=True)
  (epath.Path(W) / "a" / "x.txt").write_text("x")
  assert open(_local(gcs, "a", "x.txt")).read() == "x"
  with pytest.raises(NotADirectoryError):  # what os-level code on the URI meets
    os.makedirs(W, exist_ok=True)
  with pytest.raises(NotADirectoryError):
    open(f"{W}/results.json", "w")
  assert not workdir_io.is_local(W) and workdir_io.is_local("w") and workdir_io.is_local("/w")
  assert str(workdir_io.workdir_path(W)) == W
  assert str(workdir_io.workdir_path("w")) == os.path.join(os.getcwd(), "w")


def test_results_json_in_a_bucket(gcs):
  workdir_io.workdir_path(W).mkdir(parents=True)  # what the lock does (a folder of the fake)
  results_lib.check_writable(W)
  assert not os.path.exists(_local(gcs, "results.json"))  # the probe leaves nothing behind
  path = results_lib.write_results(W, {"step": 3, "mAP": np.float32(0.5)})
  assert path == f"{W}/results.json"
  assert json.loads(open(_local(gcs, "results.json")).read()) == {"mAP": 0.5, "step": 3}
  assert sorted(os.listdir(gcs.local(W))) == ["results.json"]  # one object write, no temp file
  assert ("open:w", f"{W}/results.json") in gcs.calls
  assert not any(fn in ("rename", "replace") for fn, _ in gcs.calls)


def test_lock_object_in_a_bucket(gcs, monkeypatch):
  monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.01)
  held = set()  # this test's own record of the workdirs this process holds
  monkeypatch.setattr(workdir_lock, "_HELD", held)
  lock = workdir_lock.acquire(W, mode="train")
  try:
    assert lock.held and lock.fd is None
    info = workdir_lock.read_holder(W)
    assert info["run_id"] == lock.run_id and info["host"] == socket.gethostname()
    assert info["workdir"] == W and isinstance(info["heartbeat_unix"], float)
    assert sorted(os.listdir(gcs.local(W))) == [".lock"]  # no flock file, no temp file
    with pytest.raises(errors.WorkdirLockedError, match="already locked by this process"):
      workdir_lock.acquire(W)
    # Another process's view: a live record refuses the run, naming it and the lock object.
    held.clear()
    with pytest.raises(errors.WorkdirLockedError) as refused:
      workdir_lock.acquire(W, mode="eval")
    assert f"workdir {W} is in use by another run (--mode=train, pid {os.getpid()}" \
        in str(refused.value)
    assert f"delete {W}/.lock to start sooner" in str(refused.value)
  finally:
    lock.release()
  assert not lock.held and os.listdir(gcs.local(W)) == []  # released: the object is deleted
  # A missing workdir is left alone by the modes that do not create one.
  assert not workdir_lock.acquire("gs://bucket/nowhere", create=False).held
  assert not os.path.exists(gcs.local("gs://bucket/nowhere"))


def _write_record(fs, **fields):
  info = dict({"pid": 1, "host": "elsewhere", "mode": "train", "run_id": "other",
               "started_unix": time.time()}, **fields)
  os.makedirs(fs.local(W), exist_ok=True)
  with open(_local(fs, ".lock"), "w") as f:
    json.dump(info, f)


def test_stale_lock_object_is_taken_over(gcs, monkeypatch):
  monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.01)
  _write_record(gcs, heartbeat_unix=time.time() - workdir_lock.STALE_S + 60)
  with pytest.raises(errors.WorkdirLockedError, match="pid 1 on host elsewhere"):
    workdir_lock.acquire(W)
  _write_record(gcs, heartbeat_unix=time.time() - workdir_lock.STALE_S - 60)  # dead holder
  with workdir_lock.locked(W, mode="eval") as lock:
    assert workdir_lock.read_holder(W)["run_id"] == lock.run_id
  assert not os.path.exists(_local(gcs, ".lock"))


def test_lock_object_race_lost(gcs, monkeypatch):
  """Two runs that both saw no lock: the later write wins, the earlier run backs off."""

  def rival_writes(seconds):  # another run writes its record while this one settles
    del seconds
    _write_record(gcs, heartbeat_unix=time.time())

  monkeypatch.setattr(workdir_lock, "time", types.SimpleNamespace(
      time=time.time, sleep=rival_writes, monotonic=time.monotonic))
  with pytest.raises(errors.WorkdirLockedError, match="pid 1 on host elsewhere"):
    workdir_lock.acquire(W)
  assert workdir_lock.read_holder(W)["run_id"] == "other"  # the winner's record stays
  assert not workdir_lock._HELD  # pylint: disable=protected-access


def test_lock_object_heartbeat(gcs, monkeypatch):
  monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.01)
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  lock = workdir_lock.acquire(W)
  try:
    first = workdir_lock.read_holder(W)["heartbeat_unix"]
    deadline = time.monotonic() + 60
    while workdir_lock.read_holder(W)["heartbeat_unix"] == first:
      assert time.monotonic() < deadline, "no heartbeat in 60 s"
      time.sleep(0.05)
  finally:
    lock.release()
  assert not lock.thread.is_alive() and not os.path.exists(_local(gcs, ".lock"))


def test_lock_object_heartbeat_survives_a_non_io_error(gcs, monkeypatch):
  """A failure that is not an OSError (e.g. a credentials refresh) must not end the heartbeat:
  a dead heartbeat lets the lock go stale, and a second run in, while this run still writes."""
  monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.01)
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  lock = workdir_lock.acquire(W)
  read, failures = workdir_lock.read_holder, []

  def flaky_read(workdir):
    if len(failures) < 2:
      failures.append(1)
      raise RuntimeError("credentials refresh failed")
    return read(workdir)
  try:
    holder = None
    while holder is None:  # None: read while the heartbeat rewrites the object
      holder = read(W)
    first = holder["heartbeat_unix"]
    monkeypatch.setattr(workdir_lock, "read_holder", flaky_read)
    deadline = time.monotonic() + 60
    # read_holder gives None while the heartbeat is rewriting the object (a read mid-write).
    while (read(W) or {}).get("heartbeat_unix", first) == first:
      assert time.monotonic() < deadline, "no heartbeat in 60 s after the errors"
      time.sleep(0.05)
    assert len(failures) == 2 and lock.thread.is_alive()
  finally:
    monkeypatch.setattr(workdir_lock, "read_holder", read)
    lock.release()


class _Tracklet:
  def __init__(self, pid, camid, frames):
    self.pid, self.camid, self.frames, self.num_frames = pid, camid, frames, len(frames)


def test_features_figures_and_visrank_in_a_bucket(gcs, tmp_path):
  frames_dir = tmp_path / "frames"  # dataset frames stay local
  frames_dir.mkdir()
  tracklets = []
  for i in range(3):
    frame = frames_dir / f"t{i}_f0.jpg"
    frame.write_bytes(b"not a real jpeg")
    tracklets.append(_Tracklet(i % 2, i, [str(frame)]))
  feats = np.arange(6, dtype=np.float32).reshape(3, 2)
  npy = f"{W}/features/query.npy"
  assert features_io.write_features(npy, feats, ["a", "b", "c"], tracklets) == (
      npy, f"{W}/features/query.csv")
  np.testing.assert_array_equal(np.load(_local(gcs, "features", "query.npy")), feats)
  got, pids, cams = features_io.read_arrays(npy, mmap=True)
  np.testing.assert_array_equal(got, feats)
  assert pids.tolist() == [0, 1, 0] and cams.tolist() == [0, 1, 2]
  with pytest.raises(features_io.MissingFileError, match=f"{W}/features/gallery.npy"):
    features_io.read_features(f"{W}/features/gallery.npy")
  # Figures: a ranked list, and the stack that reads it back.
  (workdir_io.workdir_path(W) / "v").mkdir()  # the modes make their folders first
  matches = [{"rank": 1, "pid": 1, "distance": 0.5, "first_frame": tracklets[1].frames[0]}]
  png = figures.ranked_list_png(f"{W}/v/a.png", tracklets[0].frames[0], 0, matches, 16, 8)
  stacked = figures.stack_pngs([png, png], f"{W}/v/both.png")
  for name in ("a.png", "both.png"):
    assert open(_local(gcs, "v", name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert stacked == f"{W}/v/both.png"
  # visrank: torchreid's folders, frames copied from the dataset into the bucket.
  dist = np.asarray([[0.0, 0.2, 0.1]], np.float32)
  written = visrank.export_visrank(f"{W}/visrank", dist, tracklets[:1], tracklets, topk=2)
  assert written == [f"{W}/visrank/t0_f0"]
  assert sorted(os.listdir(_local(gcs, "visrank", "t0_f0"))) == [
      "gallery_top001_TRUE", "gallery_top002_FALSE", "query_top000"]
  assert os.listdir(_local(gcs, "visrank", "t0_f0", "gallery_top001_TRUE")) == ["t2_f0.jpg"]
  assert not os.path.exists(tmp_path / "cwd" / "features")


def _train_config(root):
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config("baseline,smoke")  # the cheapest model to compile
  config.dataset.root = str(root)
  config.model.depth, config.model.width = 18, 0.125
  config.data.eval_batch_size = 16
  config.optim.num_epochs = 1  # 4 steps, one validation, checkpoints at steps 4 (and best)
  return config


@pytest.mark.slow
def test_train_resume_eval_extract_in_a_bucket(gcs, tmp_path, monkeypatch, fast_compiles):
  """A whole run with `--workdir=gs://...`: train (checkpoints, best/, TensorBoard, results),
  a second train run that resumes from the bucket, eval, extract and visualize's scalar reader.
  Every workdir access goes through epath (the fake fails os-level ones) or orbax."""
  del fast_compiles
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  from stmn_jax import app  # pylint: disable=g-import-not-at-top
  from stmn_jax import visualize  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.01)
  # clu's TensorBoard writer goes through TensorFlow's own filesystem (gs:// included), which
  # the fake cannot reach: it is handed the mapped folder, and must have been given the URI.
  logdirs, real_writer = [], metric_writers.create_default_writer
  monkeypatch.setattr(metric_writers, "create_default_writer", lambda logdir, **kw: (
      logdirs.append(logdir), real_writer(gcs.local(logdir), **kw))[1])
  config = _train_config(tmp_path / "data")
  local = gcs.local(W)

  summary = app.run(config, W, "train")
  assert logdirs == [W]
  results = json.loads(open(os.path.join(local, "results.json")).read())
  assert results["step"] == summary["step"] == results["total_steps"]
  step = results["step"]
  names = set(os.listdir(local))
  assert {"results.json", "checkpoints", "best"} <= names, names
  assert not names & {".lock", ".lock.flock"}, names  # the lock object was deleted
  assert any(n.startswith("events.out.tfevents") for n in names), names
  # Orbax took its gs:// route: steps committed by a marker file, not by a rename.
  assert os.path.exists(os.path.join(local, "checkpoints", str(step), "commit_success.txt"))
  assert os.listdir(os.path.join(local, "best")) == [str(results["history"][-1]["step"])]
  assert ("open:w", f"{W}/results.json") in gcs.calls
  assert os.listdir(".") == ["gs:"]  # nothing went to a local `gs:/...` tree

  # A second run resumes from the bucket's newest checkpoint: nothing left to train.
  again = app.run(config, W, "train")
  assert again["step"] == step and again["history"] == results["history"]
  np.testing.assert_allclose(again["test"]["mAP"], results["test"]["mAP"], atol=1e-6)

  evaluated = app.run(config, W, "eval")
  np.testing.assert_allclose(evaluated["test"]["mAP"], results["test"]["mAP"], atol=1e-6)
  assert json.loads(open(os.path.join(local, "results.json")).read())["mode"] == "eval"

  extracted = app.run(config, W, "extract", split="query")
  assert extracted["embeddings"] == f"{W}/features/query.npy"
  feats, pids, _ = features_io.read_arrays(extracted["embeddings"])
  assert feats.shape[0] == len(pids) == extracted["num_tracklets"]
  assert sorted(os.listdir(os.path.join(local, "features"))) == ["query.csv", "query.npy"]

  # ONNX export (through epath) and the parameters checkpoint (orbax) into the bucket. The
  # SavedModel format is left out: TensorFlow writes it through its own filesystem.
  exported = app.run(config, W, "export", export_format="onnx")
  assert exported["onnx"] == f"{W}/export/model.onnx"
  assert exported["params"] == f"{W}/export/params"
  assert open(_local(gcs, "export", "model.onnx"), "rb").read(2)  # a non-empty file
  assert os.path.exists(_local(gcs, "export", "params", "commit_success.txt"))

  scalars = visualize.read_scalars(W)  # the event files, read back through epath
  assert len(scalars["train_loss"][0]) == len(results["loss_history"])
  assert os.listdir(".") == ["gs:"]
