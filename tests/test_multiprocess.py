"""Two processes x 2 CPU devices (loopback, gloo) train like one process with 4 devices.

The parent starts two `tests/multiprocess_worker.py` processes, each with its own
`XLA_FLAGS=--xla_force_host_platform_device_count=2` set in the child environment before jax
is imported (this process has 4 devices from conftest.py). Both join through
`sharding.maybe_initialize_distributed` at 127.0.0.1:<free port>, run 3 steps of the real
training loop (`train.train_and_evaluate`, engine stand-in model, global batch 8 = 4 rows per
process) and save their parameters. The parent then runs the same loop on its own 4 devices.

Checked: both processes end with bit-identical parameters; they equal the single-process
parameters within rtol 1e-5 / atol 1e-6 (the only difference is the order of the cross-device
reductions), as do the per-step losses; each process read a different half of every global
batch (rows 0-3 / 4-7, as the single process's batch); the run saved its step-2 checkpoint;
training moved the parameters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from stmn_jax import sharding
from stmn_jax import train
from stmn_jax import train_state
from tests import engine_stubs as stubs
from tests import multiprocess_worker as worker

STEPS = 3
CHILD_TIMEOUT_S = 400  # generous: a loaded 2-core machine ran the pair 5x slower than idle
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=2"])
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run_two_processes(root: str, tmp) -> list[dict[str, np.ndarray]]:
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    log = open(tmp / f"worker{i}.log", "w+")
    logs.append(log)
    cmd = [sys.executable, "-m", "tests.multiprocess_worker", "--root", root,
           "--workdir", str(tmp / "work_mp"), "--out", str(tmp / f"params{i}.npz"),
           "--steps", str(STEPS), "--coordinator_address", f"127.0.0.1:{port}",
           "--num_processes", "2", "--process_id", str(i)]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=log,
                                  stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=CHILD_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:  # bounded: whatever is still running is killed
      if p.poll() is None:
        p.kill()
        p.wait(timeout=10)
  outs = []
  for i, (p, log) in enumerate(zip(procs, logs)):
    log.seek(0)
    text = log.read()
    log.close()
    assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{text[-3000:]}"
    outs.append(dict(np.load(tmp / f"params{i}.npz", allow_pickle=False)))
  return outs


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  root = tmp_path / "frames"
  root.mkdir()
  worker.tiny_split(str(root), write=True)
  mp = _run_two_processes(str(root), tmp_path)

  assert jax.device_count() == 4 and jax.process_count() == 1
  params, losses, rows = worker.train_params(str(root), str(tmp_path / "work_1p"), STEPS)
  ref = worker.flat_params(params)

  for i, out in enumerate(mp):
    # (process_index, process_count, local devices, global devices)
    np.testing.assert_array_equal(out["__process__"], [i, 2, 2, 4])
  keys = sorted(k for k in ref)
  assert keys == sorted(k for k in mp[0] if not k.startswith("__"))
  for k in keys:
    np.testing.assert_array_equal(mp[0][k], mp[1][k], err_msg=f"processes differ at {k}")
    np.testing.assert_allclose(mp[0][k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  ref_losses = np.asarray([l for _, l in losses])
  assert len(ref_losses) == STEPS
  np.testing.assert_allclose(mp[0]["__losses__"], ref_losses, rtol=1e-5)
  np.testing.assert_allclose(mp[1]["__losses__"], ref_losses, rtol=1e-5)

  # The multi-process run saved its step-2 checkpoint (orbax, both processes taking part).
  assert (tmp_path / "work_mp" / "checkpoints" / "2").is_dir()

  # Each process read its own consecutive half of every global batch.
  half = rows["pid"].shape[1] // 2
  assert rows["pid"].shape == (STEPS, 8)
  for i, out in enumerate(mp):
    sl = slice(i * half, (i + 1) * half)
    np.testing.assert_array_equal(out["__pid__"], rows["pid"][:, sl])
    np.testing.assert_allclose(out["__frame_sum__"], rows["frame_sum"][:, sl], rtol=1e-5)
  assert not np.allclose(mp[0]["__frame_sum__"], mp[1]["__frame_sum__"])

  # Training moved the parameters (the comparison is not between two initial states).
  fresh, _ = train_state.create_train_state(
      worker.run_config(), 8, 10, sharding.make_mesh(), stubs.tiny_model_fn)
  init = worker.flat_params(jax.device_get(nnx.to_pure_dict(fresh.model_state)))
  assert np.abs(init["proj/kernel"] - ref["proj/kernel"]).max() > 1e-4
  assert np.abs(init["bn/mean"] - mp[0]["bn/mean"]).max() > 1e-4


def test_initialize_needs_all_three_settings(monkeypatch):
  for name in ("STMN_COORDINATOR_ADDRESS", "STMN_NUM_PROCESSES", "STMN_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  with pytest.raises(ValueError, match="process id"):
    sharding.maybe_initialize_distributed("127.0.0.1:1234", 2, -1)
