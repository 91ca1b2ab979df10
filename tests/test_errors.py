"""Errors a user can read: `main.py` prints the message of a known error, without a traceback.

Subprocess runs of `main.py` for the known errors (a missing dataset root, a batch that does
not divide over the devices, an eval of a workdir without a checkpoint, a non-finite loss, a
results.json that cannot be written): non-zero exit, the useful line, no traceback; with
`--verbose` the traceback is back. In-process: the handler keeps other exceptions' tracebacks,
the error types stay subclasses of the builtin types raised before, results.json is checked
before the work and written atomically.
"""

from __future__ import annotations

import json
import os

import pytest

from configs import synthetic
from data_pipelines.readers.common import DatasetError
from stmn_jax import app
from stmn_jax import errors
from stmn_jax import results as results_lib
from tests.test_main import _main

SMOKE = "--config=configs/synthetic.py:smoke"


def _assert_reported(proc, *lines: str) -> None:
  assert proc.returncode == 1, proc.stderr[-3000:]
  for line in lines:
    assert line in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_batch_not_dividing_over_devices_with_and_without_verbose(tmp_path):
  args = [SMOKE, f"--workdir={tmp_path / 'w'}", f"--config.dataset.root={tmp_path / 'd'}",
          "--config.data.num_ids_per_batch=3", "--config.data.num_tracklets_per_id=3"]
  useful = "(3 x 3) = 9 must be a positive multiple of the number of devices (4)"
  proc = _main(*args, timeout=300)
  _assert_reported(proc, "main.py: train batch config.data.num_ids_per_batch", useful)
  assert not os.path.exists(tmp_path / "d")  # before the dataset is generated
  proc = _main(*args, "--verbose", timeout=300)
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "stmn_jax.errors.ConfigError: " in proc.stderr
  assert useful in proc.stderr


def test_missing_dataset_root(tmp_path):
  missing = tmp_path / "no_mars_here"
  proc = _main("--config=configs/mars.py:smoke", f"--config.dataset.root={missing}",
               f"--workdir={tmp_path / 'w'}", timeout=300)
  _assert_reported(proc, "main.py: ", str(missing))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_eval_of_a_workdir_without_checkpoint(tmp_path):
  workdir = tmp_path / "empty"
  workdir.mkdir()
  proc = _main(SMOKE, f"--workdir={workdir}", "--mode=eval", timeout=300)
  _assert_reported(proc, f"main.py: --workdir={workdir}: no checkpoint (expected one of ",
                   "train first)")


def test_eval_with_unwritable_results_fails_before_the_work(tmp_path):
  """results.json that cannot be written (a folder in its place: chmod does not stop root)."""
  workdir = tmp_path / "w"
  (workdir / "results.json").mkdir(parents=True)
  with pytest.raises(errors.WorkdirNotWritableError,
                     match=r"cannot write .*results\.json: \[Errno 21\] Is a directory"):
    app.run(synthetic.get_config("smoke"), str(workdir), "eval")  # no checkpoint needed
  # A failing write after the work names the path and the OS error, and keeps the old file.
  workdir2 = tmp_path / "w2"
  workdir2.mkdir()
  results_lib.write_results(str(workdir2), {"step": 1})
  results_lib.check_writable(str(workdir2))
  tmp = workdir2 / f"results.json.{os.getpid()}.tmp"
  tmp.mkdir()  # the temporary file cannot be made
  with pytest.raises(errors.WorkdirNotWritableError, match=r"cannot write .*results\.json: "):
    results_lib.write_results(str(workdir2), {"step": 2})
  assert json.loads((workdir2 / "results.json").read_text()) == {"step": 1}
  # The probe leaves no results.json behind where there was none.
  workdir3 = tmp_path / "w3"
  workdir3.mkdir()
  results_lib.check_writable(str(workdir3))
  assert os.listdir(workdir3) == []


@pytest.mark.slow
def test_non_finite_loss(tmp_path):
  """One training step with an infinite loss weight (compiles the train step: ~30 s)."""
  proc = _main(SMOKE, f"--workdir={tmp_path / 'w'}", f"--config.dataset.root={tmp_path / 'd'}",
               "--config.loss.ce_weight=inf", "--config.train.log_every_steps=1", timeout=600)
  _assert_reported(proc, "main.py: non-finite loss", " at step ")


def test_handler_prints_user_errors_and_keeps_other_tracebacks(capsys, monkeypatch):
  def fail(e):
    def fn():
      raise e
    return fn

  for e in (errors.ConfigError("bad field"), DatasetError("no dataset"),
            errors.CheckpointNotFoundError("no checkpoint"),
            errors.NonFiniteLossError("non-finite loss"), errors.WorkdirLockedError("in use")):
    with pytest.raises(SystemExit) as exit_info:
      errors.report_user_errors(fail(e))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"main.py: {e}\n"
    with pytest.raises(type(e)):  # --verbose: the exception itself, traceback and all
      errors.report_user_errors(fail(e), verbose=True)
  with pytest.raises(RuntimeError, match="a bug"):  # unexpected: never swallowed
    errors.report_user_errors(fail(RuntimeError("a bug")))
  with pytest.raises(ValueError, match="plain"):  # builtin ValueErrors are not user errors
    errors.report_user_errors(fail(ValueError("plain")))
  assert errors.report_user_errors(lambda: 7) == 7
  for value, verbose in (("1", True), ("true", True), ("0", False), ("", False)):
    monkeypatch.setenv(errors.VERBOSE_ENV, value)
    assert errors.verbose_from_env() is verbose


def test_error_types_keep_the_builtin_bases():
  assert issubclass(errors.ConfigError, ValueError)
  assert issubclass(errors.ConfigFileNotFoundError, FileNotFoundError)
  assert issubclass(errors.CheckpointError, RuntimeError)
  assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
  assert issubclass(errors.CheckpointMismatchError, ValueError)
  assert issubclass(errors.NonFiniteLossError, FloatingPointError)
  assert issubclass(errors.WorkdirNotWritableError, OSError)
  assert str(errors.CheckpointNotFoundError("msg")) == "msg"
  for t in (errors.ConfigError, errors.CheckpointError, errors.NonFiniteLossError,
            errors.WorkdirLockedError, errors.WorkdirNotWritableError, DatasetError):
    assert issubclass(t, errors.USER_ERRORS)
