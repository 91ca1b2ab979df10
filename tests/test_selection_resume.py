"""Model selection survives kills; failed checkpoint saves stop the run at once.

- A training process with validation is SIGKILLed at several moments around an evaluation that
  gives a new best (before it, after it, right after the `new best` log line while `best/` is
  written in the background, one step later), then the same command runs to the end: the
  selected step, the test metrics and the validation / loss histories equal those of an
  uninterrupted run. The runs are subprocesses (`python -m tests.test_selection_resume`) of the
  tiny stub model on tiny PNG tracklets.
- A background save of `best/` that fails with ENOSPC stops the run at the next step boundary
  with one `CheckpointError` naming the checkpoint's path; `inference.restore_model` (what
  `--mode=eval` restores) still works on the last good checkpoint, and a restart finishes
  like an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging
from orbax.checkpoint._src.path import atomicity
from PIL import Image

from data_pipelines.tracklets import Split, Tracklet
from stmn_jax import checkpoints
from stmn_jax import inference
from stmn_jax import models
from stmn_jax import sharding
from stmn_jax import train
from stmn_jax import train_state
from tests import engine_stubs as stubs

pytestmark = pytest.mark.usefixtures("fast_compiles")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 8  # 4 epochs x 2 steps; validation after every epoch: steps 2, 4, 6, 8
CAM_SHIFT = np.asarray([[0, 0, 0], [1, -1, 0], [0, 1, -1]])


# ------------------------------------------------------------------------------ the run
def _split(root: str) -> Split:
  """10 training ids x 2 cameras (4 held out for validation), 4 test ids; 16x8 PNG frames."""
  os.makedirs(root, exist_ok=True)
  rs = np.random.RandomState(0)

  def tracklet(pid, cam, tag):
    paths = []
    for f in range(4):
      path = os.path.join(root, f"{tag}_{pid}_{cam}_{f}.png")
      # An identity's colour, shifted by its camera (what training learns to discount).
      base = np.asarray([(37 * pid) % 160, (91 * pid) % 160, (53 * pid) % 160]) + 60 * CAM_SHIFT[cam]
      img = np.clip(base + rs.randint(0, 50, size=(16, 8, 3)), 0, 255).astype(np.uint8)
      if not os.path.exists(path):
        Image.fromarray(img).save(path)
      paths.append(path)
    return Tracklet(tuple(paths), pid, cam)

  train_t = tuple(tracklet(p, c, "tr") for p in range(10) for c in (p % 3, (p + 1) % 3))
  query = tuple(tracklet(p, 0, "te") for p in range(20, 26))
  gallery = tuple(tracklet(p, c, "te") for p in range(20, 26) for c in (1, 2))
  return Split("tiny", train_t, query, gallery)


def _config():
  config = stubs.tiny_config()
  config.optim.num_epochs, config.optim.steps_per_epoch = 4, 2
  config.optim.learning_rate = 1e-2
  config.seed = 0
  config.train.eval_every_epochs = 1
  config.train.checkpoint_every_steps = 3  # also a checkpoint at every evaluation step
  config.train.log_every_steps = 1
  config.dataset.num_val_ids = 4
  config.dataset.num_val_queries = 8
  return config


def _run(workdir: str, root: str, **kw) -> dict:
  _, summary = train.train_and_evaluate(
      _config(), workdir, model_fn=stubs.tiny_model_fn, loss_fn=stubs.tiny_loss_fn,
      split=_split(root), **kw)
  return summary


class _KillOnLog(logging.Handler):
  """SIGKILLs this process at the first log line that matches `pattern`."""

  def __init__(self, pattern: str):
    super().__init__()
    self.pattern = re.compile(pattern)

  def emit(self, record):
    if self.pattern.search(record.getMessage()):
      os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_commit(relpath: str, after: bool) -> None:
  """SIGKILLs this process when orbax commits `WORKDIR/<relpath>` (the rename of its tmp
  folder): just before it (`after` False: the tmp folder stays) or just after it."""
  real = atomicity.on_commit_callback

  async def commit(tmp_dir, *args, **kwargs):
    hit = str(tmp_dir.get_final()).endswith(os.sep + relpath)
    if hit and not after:
      os.kill(os.getpid(), signal.SIGKILL)
    out = await real(tmp_dir, *args, **kwargs)
    if hit and after:
      os.kill(os.getpid(), signal.SIGKILL)
    return out

  atomicity.on_commit_callback = commit


def _child_main(workdir: str, root: str, kill: str) -> None:
  """One training run (the body of a subprocess), SIGKILLed at `kill` unless empty:
  "log:REGEX" (a log line), "commit-before:RELPATH" / "commit-after:RELPATH" (orbax's commit of
  a checkpoint folder)."""
  jax.config.update("jax_disable_most_optimizations", True)  # as the `fast_compiles` fixture
  absl_logging.set_verbosity(absl_logging.INFO)
  kind, _, arg = kill.partition(":")
  if kind == "log":
    absl_logging.get_absl_logger().addHandler(_KillOnLog(arg))
  elif kind in ("commit-before", "commit-after"):
    _kill_at_commit(arg, after=kind == "commit-after")
  elif kind:
    raise ValueError(f"kill={kill!r}")
  _run(workdir, root)


def _spawn(workdir: str, root: str, kill: str = "") -> subprocess.CompletedProcess:
  """Runs `_child_main` in a fresh process (4 fake CPU devices)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
      [sys.executable, "-m", "tests.test_selection_resume", workdir, root, kill],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _best_of(summary: dict) -> int:
  return int(re.fullmatch(r"best by val mAP \(step (\d+)\)", summary["test_checkpoint"]).group(1))


def _json(x):
  return json.loads(json.dumps(x, default=lambda a: a.tolist()))


def _tmp_folders(workdir: str) -> list[str]:
  return [os.path.join(d, n) for d in ("checkpoints", "best")
          for n in os.listdir(os.path.join(workdir, d)) if "orbax-checkpoint-tmp" in n]


def _assert_same_outcome(got: dict, ref: dict) -> None:
  assert got["test_checkpoint"] == ref["test_checkpoint"]
  assert got["history"] == ref["history"]
  assert got["loss_history"] == ref["loss_history"]
  assert got["train"] == ref["train"]
  assert got["test"] == ref["test"]


# ------------------------------------------------------------------------------ kill and resume
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(data root, results.json of an uninterrupted run, its selected step)."""
  tmp = tmp_path_factory.mktemp("selection")
  root, workdir = str(tmp / "data"), str(tmp / "ref")
  proc = _spawn(workdir, root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref = _results(workdir)
  assert [h["step"] for h in ref["history"]] == [2, 4, 6, 8]
  best = _best_of(ref)
  assert best > 2, ref["history"]  # not trivial: an older best exists to fall back on wrongly
  return root, ref, best


@pytest.mark.slow
@pytest.mark.parametrize("moment", [
    "before_eval", "after_eval", "latest_uncommitted", "best_uncommitted", "new_best_logged",
    "best_committed", "final_test"])
def test_kill_at_any_moment_then_rerun_selects_the_same(reference, tmp_path, moment):
  root, ref, best = reference
  kills = {  # around the evaluation at `best` (a new best), in the order they happen
      "before_eval": rf"log:^step {best}/{TOTAL_STEPS} ",  # last checkpoint: the one before
      "after_eval": rf"log:^eval on val at step {best}:",  # evaluated, nothing saved yet
      "latest_uncommitted": f"commit-before:checkpoints/{best}",  # its tmp folder left
      "best_uncommitted": f"commit-before:best/{best}",  # checkpoints/<best> is committed
      "new_best_logged": rf"log:^new best val mAP .* at step {best}$",  # best/<best> in flight
      "best_committed": f"commit-after:best/{best}",
      "final_test": r"log:^results written to ",  # after the last checkpoint and the test
  }
  workdir = str(tmp_path / "w")
  killed = _spawn(workdir, root, kills[moment])
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  left = {"latest_uncommitted": "checkpoints", "best_uncommitted": "best"}.get(moment)
  if left:  # the killed save left its tmp folder
    assert any(n.startswith(f"{best}.orbax-checkpoint-tmp")
               for n in os.listdir(os.path.join(workdir, left)))
  again = _spawn(workdir, root)
  assert again.returncode == 0, again.stderr[-3000:]
  _assert_same_outcome(_results(workdir), ref)
  assert os.listdir(os.path.join(workdir, "best")) == [str(best)]
  assert _tmp_folders(workdir) == []
  with checkpoints.Checkpointer(workdir, read_only=True) as ck:  # what --mode=eval restores
    assert ck.best_step() == best


def test_resume_from_a_checkpoint_without_selection_state(tmp_path, monkeypatch):
  """A workdir of an older version, killed as in the bug report: `checkpoints/6` (state only)
  committed, `best/4` committed, `best/6` never committed. --mode=eval restores best/4; the
  resumed run redoes the evaluation at 6 and selects as the uninterrupted run."""
  root = str(tmp_path / "data")
  ref = _run(str(tmp_path / "ref"), root)
  assert _best_of(ref) == 6 and [h["step"] for h in ref["history"]] == [2, 4, 6, 8]
  config, mesh = _config(), sharding.make_mesh()
  state, _ = train_state.create_train_state(config, 6, 2, mesh, stubs.tiny_model_fn)
  with checkpoints.Checkpointer(str(tmp_path / "ref"), read_only=True) as ck:
    trees = {s: ck.restore(state.checkpoint_tree(), "latest", step=s) for s in (4, 6)}
  # The older version's layout: single-item managers (orbax's "default" item), metrics in best/.
  workdir = str(tmp_path / "w")
  latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=3))
  best = ocp.CheckpointManager(os.path.join(workdir, "best"), options=ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: float(m["mAP"]), best_mode="max"))
  for s in (4, 6):
    latest.save(s, args=ocp.args.StandardSave(trees[s]))
  metrics4 = checkpoints.scalar_metrics(ref["history"][1]["val"])
  best.save(4, args=ocp.args.StandardSave(trees[4]), metrics=metrics4)
  latest.close()
  best.close()
  os.makedirs(os.path.join(workdir, "best", "6.orbax-checkpoint-tmp-1234"))  # killed mid-save

  _tiny_registry(monkeypatch)
  restored, label, step = inference.restore_model(config, workdir, mesh)
  assert (label, step, restored.step) == ("best checkpoint (step 4)", 4, 4)
  restored, label, step = inference.restore_model(config, workdir, mesh, which="latest")
  assert (label, step, restored.step) == ("latest checkpoint (step 6)", 6, 6)

  got = _run(workdir, root)
  assert got["test_checkpoint"] == ref["test_checkpoint"]
  assert _json(got["test"]) == _json(ref["test"])
  assert got["history"] == ref["history"][2:]  # the evaluations before step 6 are lost
  assert got["history_incomplete"]
  assert os.listdir(os.path.join(workdir, "best")) == ["6"]


# ------------------------------------------------------------------------------ failed saves
def _tiny_registry(monkeypatch):
  """`models.create_model` -> the stub model, so that `inference.restore_model` (what
  `--mode=eval` uses) restores the workdirs of these tests."""
  monkeypatch.setattr(models, "create_model",
                      lambda config, num_classes, rngs, **kw: stubs.tiny_model_fn(
                          config, num_classes, rngs))


def test_failed_best_save_stops_at_next_step_and_last_good_checkpoint_works(
    tmp_path, monkeypatch):
  root = str(tmp_path / "data")
  ref = _run(str(tmp_path / "ref"), root)
  new_bests = [h["step"] for i, h in enumerate(ref["history"])
               if h["val"]["mAP"] > max([0.0] + [g["val"]["mAP"] for g in ref["history"][:i]])]
  assert len(new_bests) >= 2, ref["history"]
  first, failing = new_bests[0], new_bests[1]
  workdir = str(tmp_path / "w")
  failing_path = os.path.join(workdir, "best", str(failing))

  # The background commit of best/<failing> fails as on a full disk.
  failed = threading.Event()
  real_commit = atomicity.on_commit_callback

  async def full_disk(tmp_dir, *args, **kwargs):
    if str(tmp_dir.get_final()) == failing_path:
      failed.set()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_dir.get()))
    return await real_commit(tmp_dir, *args, **kwargs)

  # The step after the failing save waits until the failure is in (so "the next step boundary"
  # is deterministic), and records the steps run.
  steps_run = []
  real_step = train_state.train_step

  def step_and_record(state, step_fn, batch):
    if state.step == failing:
      assert failed.wait(60)
      deadline = time.time() + 30
      while any(t.name == "save_finalize" and t.is_alive() for t in threading.enumerate()):
        assert time.time() < deadline
        time.sleep(0.05)
    steps_run.append(state.step)
    return real_step(state, step_fn, batch)

  monkeypatch.setattr(atomicity, "on_commit_callback", full_disk)
  monkeypatch.setattr(train_state, "train_step", step_and_record)
  with pytest.raises(checkpoints.CheckpointError) as info:
    _run(workdir, root)
  message = str(info.value)
  assert "\n" not in message
  assert f"best checkpoint of step {failing} to {failing_path} failed" in message
  assert "[Errno 28] No space left on device" in message
  assert steps_run[-1] == failing  # stopped right after the next step, nothing saved after
  monkeypatch.setattr(atomicity, "on_commit_callback", real_commit)
  monkeypatch.setattr(train_state, "train_step", real_step)

  # The last good checkpoints: checkpoints/<failing> (it names best/<failing>, never committed)
  # and best/<first>. --mode=eval restores best/<first>.
  with checkpoints.Checkpointer(workdir, read_only=True) as ck:
    assert ck.latest_step() == failing
    assert ck.best_steps() == [first]
  _tiny_registry(monkeypatch)
  state, label, step = inference.restore_model(_config(), workdir, sharding.make_mesh())
  assert (label, step) == (f"best checkpoint (step {first})", first)
  assert state.step == first

  # A restart re-saves best/<failing> from checkpoints/<failing> and ends as the reference.
  got = _run(workdir, root)
  _assert_same_outcome(_json(got), _json(ref))
  assert _tmp_folders(workdir) == []
  assert os.listdir(os.path.join(workdir, "best")) == [str(_best_of(ref))]


def test_failed_latest_save_stops_the_run(tmp_path, monkeypatch):
  """A failing `checkpoints/` save (blocking part here) is a CheckpointError naming it."""
  root = str(tmp_path / "data")
  workdir = str(tmp_path / "w")
  real_save = checkpoints.ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if str(self.directory).endswith("checkpoints") and step == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"latest checkpoint of step 3 to .*checkpoints/3 failed: \[Errno 28\]"):
    _run(workdir, root)
  with checkpoints.Checkpointer(workdir, read_only=True) as ck:
    assert ck.latest_step() == 2


if __name__ == "__main__":
  _child_main(*sys.argv[1:4])
