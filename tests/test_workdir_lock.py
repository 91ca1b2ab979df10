"""One run per workdir (`stmn_jax.workdir_lock`): real processes, kill -9, multi-host runs.

- A process holding the lock makes `main.py` on the same workdir fail within seconds, naming
  the workdir, the holder's pid and host, before any work (no dataset generated, nothing
  written); after a kill -9 of the holder the lock is free again.
- The processes of one multi-host run share the lock that process 0 takes (unit test with the
  broadcast replaced, and two real `jax.distributed` processes over gloo); a second run's
  process 0 is refused, and its other processes stop with it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import synthetic
from stmn_jax import app
from stmn_jax import errors
from stmn_jax import workdir_lock
from tests.test_main import REPO, _env, _main

HOLD = """
import sys, time
from stmn_jax import workdir_lock
lock = workdir_lock.acquire(sys.argv[1], mode="train")
print("locked", lock.run_id, flush=True)
time.sleep(600)
"""


def _start_holder(workdir: str) -> subprocess.Popen:
  """A process that takes the lock of `workdir` and sleeps; returns once it holds it."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ready, _, _ = select.select([proc.stdout], [], [], 120)
  line = proc.stdout.readline() if ready else ""
  if not line.startswith("locked"):
    proc.kill()
    raise AssertionError(f"holder did not lock: {line!r} {proc.stderr.read()[-2000:]}")
  return proc


def _kill(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)


def test_second_run_refused_fast_and_lock_freed_by_kill_9(tmp_path):
  workdir = str(tmp_path / "work")
  holder = _start_holder(workdir)
  try:
    start = time.monotonic()
    proc = _main("--config=configs/synthetic.py:smoke", f"--workdir={workdir}",
                 f"--config.dataset.root={tmp_path / 'data'}", timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"main.py: workdir {workdir} is in use by another run (--mode=train, pid " \
        f"{holder.pid} on host {socket.gethostname()}, started " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 120, elapsed  # the start of python + TF + jax; no dataset, no compile
    assert not os.path.exists(tmp_path / "data")  # refused before the dataset was generated
    assert sorted(os.listdir(workdir)) == [".lock", ".lock.flock"]
    assert workdir_lock.read_holder(workdir)["pid"] == holder.pid
  finally:
    _kill(holder)
  # The kernel freed the lock; `.lock` is the dead run's stale record, overwritten by the next.
  assert workdir_lock.read_holder(workdir)["pid"] == holder.pid
  lock = workdir_lock.acquire(workdir, mode="eval")
  try:
    assert lock.held and workdir_lock.read_holder(workdir)["pid"] == os.getpid()
  finally:
    lock.release()
  assert sorted(os.listdir(workdir)) == [".lock.flock"]


def _refuse() -> None:
  raise errors.ConfigError("nope")


def test_in_process_rules(tmp_path):
  workdir = str(tmp_path / "w")
  # Modes other than train leave a missing workdir alone (they fail on it themselves).
  lock = workdir_lock.acquire(workdir, create=False)
  assert not lock.held and not os.path.exists(workdir)
  with workdir_lock.locked(workdir, mode="train") as lock:
    info = workdir_lock.read_holder(workdir)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["mode"] == "train" and info["run_id"] == lock.run_id
    assert info["workdir"] == workdir and "command" in info and "started" in info
    # POSIX locks do not conflict inside one process: the second lock is refused by hand.
    with pytest.raises(errors.WorkdirLockedError, match="already locked by this process"):
      workdir_lock.acquire(workdir)
  assert workdir_lock.read_holder(workdir) is None
  # A failing check under the lock refuses the run and lets go of the lock.
  with pytest.raises(errors.ConfigError, match="nope"):
    workdir_lock.acquire(workdir, check=_refuse)
  workdir_lock.acquire(workdir).release()
  # app.run holds the lock while the mode runs, and lets go when it raises.
  config = synthetic.get_config("smoke")
  config.data.eval_batch_size = 3
  with pytest.raises(errors.ConfigError, match="eval_batch_size = 3"):
    app.run(config, workdir, "train")
  workdir_lock.acquire(workdir).release()


def test_processes_of_one_multihost_run_are_not_refused(tmp_path):
  """Unit test: the broadcast of process 0's decision, replaced by a recording function."""
  workdir = str(tmp_path / "w")
  sent = []

  def record(x):
    sent.append(np.array(x))
    return x

  # Run A: process 0 takes the lock; process 1 gets the same run id and is not refused.
  lock0 = workdir_lock.acquire(workdir, process_index=0, process_count=2, broadcast=record)
  lock1 = workdir_lock.acquire(workdir, process_index=1, process_count=2,
                               broadcast=lambda x: sent[-1])
  assert lock0.held and not lock1.held and lock1.run_id == lock0.run_id
  assert workdir_lock.read_holder(workdir)["process_count"] == 2
  lock1.release()  # a no-op on processes other than 0
  assert workdir_lock.read_holder(workdir)["run_id"] == lock0.run_id
  lock0.release()
  # Run B while another run holds the workdir: process 0 is refused, and process 1 with it.
  holder = _start_holder(workdir)
  try:
    with pytest.raises(errors.WorkdirLockedError, match=f"pid {holder.pid} on host"):
      workdir_lock.acquire(workdir, process_index=0, process_count=2, broadcast=record)
    with pytest.raises(errors.WorkdirLockedError,
                       match=rf"\(process 0\) workdir .* in use by .*pid {holder.pid} on host"):
      workdir_lock.acquire(workdir, process_index=1, process_count=2,
                           broadcast=lambda x: sent[-1])
  finally:
    _kill(holder)


MULTIHOST = """
import json, sys
from stmn_jax import sharding, workdir_lock
sharding.maybe_initialize_distributed(sys.argv[2], 2, int(sys.argv[3]))
with workdir_lock.locked(sys.argv[1], mode="train") as lock:
  print(json.dumps({"run_id": lock.run_id, "held": lock.held}), flush=True)
"""


def test_two_real_processes_of_one_run_share_the_lock(tmp_path):
  """Two `jax.distributed` processes (gloo, loopback): both pass, only process 0 holds."""
  workdir = str(tmp_path / "w")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = _env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, workdir, f"127.0.0.1:{port}",
                             str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=240)
      assert p.returncode == 0, err[-3000:]
      outs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      _kill(p)
  assert outs[0]["run_id"] == outs[1]["run_id"]
  assert [o["held"] for o in outs] == [True, False]
  assert sorted(os.listdir(workdir)) == [".lock.flock"]  # released at the end
