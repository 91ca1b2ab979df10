"""main.py and stmn_jax.app: flag errors, early input checks, end-to-end smoke run + eval mode."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import synthetic
from data_pipelines.readers.common import DatasetError
from stmn_jax import app
from stmn_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _main(*args, timeout=900):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO, env=_env(),
      capture_output=True, text=True, timeout=timeout,
  )


def test_unknown_config_key_names_the_key():
  with pytest.raises(errors.ConfigError, match=r"--config.optim.num_epochz: config.optim has no "
                     r"field 'num_epochz' \(did you mean config.optim.num_epochs\?\)"):
    app.check_config_overrides(
        ["--config=configs/synthetic.py:smoke", "--config.optim.num_epochz=3"],
        "configs/synthetic.py")
  with pytest.raises(ValueError, match="config has no field 'optimz'"):
    app.check_config_overrides(["--config.optimz.lr", "1"], "configs/synthetic.py")
  # Known keys pass, with both flag spellings.
  app.check_config_overrides(
      ["--config", "configs/synthetic.py:smoke", "--config.optim.num_epochs=3",
       "--config.data.erasing_area=(0.1,0.2)"], "configs/synthetic.py")
  # Through main.py itself: a clear message, non-zero exit, no traceback.
  proc = _main("--config=configs/synthetic.py:smoke", "--config.train.log_every_stepz=1",
               timeout=300)
  assert proc.returncode != 0
  assert "config.train has no field 'log_every_stepz'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_default_workdir_and_unknown_mode(tmp_path):
  assert app.default_workdir("configs/synthetic.py:baseline,smoke") == os.path.join(
      "workdir", "synthetic_baseline_smoke")
  assert app.default_workdir("configs/mars.py") == os.path.join("workdir", "mars")
  with pytest.raises(errors.ConfigError,
                     match="--mode='exprot': expected one of eval, export, extract, search, train"):
    app.run(synthetic.get_config("smoke"), str(tmp_path / "unused"), "exprot")
  assert not os.path.exists(tmp_path / "unused")  # refused before the workdir lock


def test_bad_inputs_fail_before_work(tmp_path):
  # Batch not divisible by the 4 devices: fails before the dataset is even looked at.
  config = synthetic.get_config("smoke")
  config.dataset.root = str(tmp_path / "never_made")
  config.data.num_ids_per_batch, config.data.num_tracklets_per_id = 3, 3
  with pytest.raises(errors.ConfigError, match=r"\(3 x 3\) = 9 must be a positive multiple of the "
                     r"number of devices \(4\)"):
    app.run(config, str(tmp_path / "w1"), "train")
  assert not os.path.exists(tmp_path / "never_made")
  assert not os.path.exists(tmp_path / "w1" / "checkpoints")
  # Missing dataset root of a real dataset: the reader's error names the folder.
  from configs import mars  # pylint: disable=g-import-not-at-top

  config = mars.get_config("smoke")
  missing = str(tmp_path / "no_mars_here")
  config.dataset.root = missing
  with pytest.raises(DatasetError, match="no_mars_here"):
    app.run(config, str(tmp_path / "w2"), "train")
  assert not os.path.exists(tmp_path / "w2" / "checkpoints")
  # Eval mode without a trained workdir: the missing workdir is not created.
  with pytest.raises(errors.CheckpointNotFoundError, match="train first"):
    app.run(synthetic.get_config("smoke"), str(tmp_path / "w3"), "eval")
  assert not os.path.exists(tmp_path / "w3")


@pytest.mark.slow
def test_smoke_run_end_to_end_then_eval_mode(tmp_path):
  """Smoke config: 8 synthetic ids (2 held out for validation), 8 steps on 4 fake devices."""
  workdir = str(tmp_path / "work")
  common = ["--config=configs/synthetic.py:smoke",
            f"--config.dataset.root={tmp_path / 'data'}", f"--workdir={workdir}"]
  proc = _main(*common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == 8 and results["total_steps"] == 8
  assert results["selection"] == "val" and results["num_classes"] == 6
  # Validation after each of the 2 epochs; the test run uses the best of them.
  assert [h["step"] for h in results["history"]] == [4, 8]
  best_step = max(results["history"], key=lambda h: h["val"]["mAP"])["step"]
  assert results["test_checkpoint"] == f"best by val mAP (step {best_step})"
  assert os.listdir(os.path.join(workdir, "best")) == [str(best_step)]
  assert f"Test results ({results['test_checkpoint']})" in proc.stdout
  assert "R1" in proc.stdout and "mAP" in proc.stdout
  assert 0.0 < results["test"]["mAP"] <= 1.0
  assert results["test"]["num_valid_queries"] > 0
  # Loss falls: the mean of the last logged losses is below the first logged loss.
  losses = [loss for _, loss in results["loss_history"]]
  assert len(losses) == 4 and np.isfinite(losses).all()
  assert np.mean(losses[-2:]) < losses[0], losses
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # the workdir lock was let go

  # --mode=eval restores the best checkpoint: the same numbers as the training run's test.
  proc = _main(*common, "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Test results (best checkpoint (step {best_step}))" in proc.stdout
  with open(os.path.join(workdir, "results.json")) as f:
    again = json.load(f)
  np.testing.assert_allclose(again["test"]["mAP"], results["test"]["mAP"], atol=1e-6)
  np.testing.assert_allclose(again["test"]["cmc"], results["test"]["cmc"], atol=1e-6)
