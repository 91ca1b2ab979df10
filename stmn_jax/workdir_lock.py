"""One run per workdir: an exclusive lock, taken before a run's work starts and held to its end.

Files in the workdir:
- `.lock.flock`: an empty file that the kernel locks with `fcntl.lockf` (a POSIX record lock).
  The lock belongs to the process: it goes away when the process ends however it ends
  (kill -9 included), so it never stays behind. POSIX locks work on local filesystems and
  on NFS (v4 natively, v3 through lockd); when a whole NFS client dies, the server frees its
  locks when the client's lease runs out (about 90 s on NFSv4). The file itself is never
  removed (removing a lock file while another process waits on it would let two runs in).
- `.lock`: JSON naming the holder (pid, host, start time, command, mode, run id), written
  atomically after the lock is taken and removed when it is released, so that a refused run
  can say who holds the workdir. After a kill -9 it stays behind with the dead run's entry:
  it is not the lock, and the next run that gets the lock overwrites it.

Multi-host runs: only process 0 takes the lock (the workdir is shared, or at least process 0's
is the one that matters: it writes results.json and the figures). Its decision (taken / held
by another run / error) and the run id it drew are broadcast to every process of the run with
`multihost_utils.broadcast_one_to_all`, so the other processes of the same run are never
refused, and all of them stop at once when process 0 is refused. Processes other than 0 hold
nothing and never touch the lock files.

Within one Python process a second lock of a held workdir is refused too (POSIX locks do not
conflict inside one process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import uuid
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from stmn_jax import errors

LOCK_FILE = ".lock"  # JSON: the holder
FLOCK_FILE = ".lock.flock"  # what the kernel locks
PAYLOAD_BYTES = 4096  # the decision of process 0 as broadcast (JSON, zero-padded)
HOLDER_WAIT_S = 1.0  # a refused run waits this long for the holder to write `.lock`

Broadcast = Callable[[np.ndarray], np.ndarray]

_HELD: set[str] = set()  # real paths of the workdirs this process holds


@dataclasses.dataclass
class WorkdirLock:
  """A held workdir lock (`fd` is None on processes other than 0, and when not locked)."""

  workdir: str
  run_id: str
  fd: int | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def held(self) -> bool:
    return self.fd is not None

  def release(self) -> None:
    """Removes `.lock` and frees the lock (process 0; a no-op elsewhere and when released)."""
    if self.fd is None:
      return
    try:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(self.workdir, LOCK_FILE))
    finally:
      fd, self.fd = self.fd, None
      _HELD.discard(os.path.realpath(self.workdir))
      with contextlib.suppress(OSError):
        fcntl.lockf(fd, fcntl.LOCK_UN)
      os.close(fd)


# ------------------------------------------------------------------------------ the holder
def holder_info(workdir: str, mode: str = "", run_id: str = "") -> dict[str, Any]:
  """What `.lock` records of this process: pid, host, start time, command, mode, run id."""
  now = time.time()
  return {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
      "started_unix": now,
      "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
      "mode": mode,
      "run_id": run_id,
      "workdir": os.path.abspath(workdir),
  }


def read_holder(workdir: str) -> dict[str, Any] | None:
  """The JSON of `WORKDIR/.lock`, or None when it is missing or unreadable."""
  try:
    with open(os.path.join(workdir, LOCK_FILE)) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _write_holder(workdir: str, info: dict[str, Any]) -> None:
  """Writes `.lock` atomically (a temporary file renamed over it)."""
  path = os.path.join(workdir, LOCK_FILE)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _age(seconds: float) -> str:
  seconds = max(0, int(seconds))
  if seconds < 120:
    return f"{seconds} s"
  if seconds < 7200:
    return f"{seconds // 60} min"
  return f"{seconds / 3600:.1f} h"


def _describe_holder(info: dict[str, Any] | None) -> str:
  if not info:
    return "another run (its .lock record is missing or unreadable: it may have just started)"
  started = str(info.get("started", "?"))
  if isinstance(info.get("started_unix"), (int, float)):
    started += f" ({_age(time.time() - info['started_unix'])} ago)"
  mode = f"--mode={info['mode']}, " if info.get("mode") else ""
  return (f"another run ({mode}pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
          f"started {started}; command: {info.get('command', '?')})")


def locked_message(workdir: str, info: dict[str, Any] | None) -> str:
  """The refusal: names the workdir and the run that holds it."""
  return (f"workdir {os.path.abspath(workdir)} is in use by {_describe_holder(info)}. One run "
          "per workdir: wait for that run to end (or stop it), or pass another --workdir.")


# ------------------------------------------------------------------------------ process 0
def _lock_here(workdir: str, create: bool, info: dict[str, Any]) -> WorkdirLock:
  """Takes the lock in this process and writes `.lock` (`info`); raises WorkdirLockedError
  naming the holder when another run (or this process) holds it."""
  real = os.path.realpath(workdir)
  if real in _HELD:
    raise errors.WorkdirLockedError(
        f"workdir {os.path.abspath(workdir)} is already locked by this process "
        f"(pid {os.getpid()}): one run per workdir")
  if create:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise errors.WorkdirNotWritableError(f"cannot create workdir {workdir}: {e}") from e
  try:
    fd = os.open(os.path.join(workdir, FLOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.WorkdirNotWritableError(f"cannot write to workdir {workdir}: {e}") from e
  try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.EACCES, errno.EAGAIN):
      logging.warning("workdir %s: the filesystem does not support locks (%s); running "
                      "without the one-run-per-workdir lock", workdir, e)
      return WorkdirLock(workdir=workdir, run_id=info["run_id"])
    deadline = time.monotonic() + HOLDER_WAIT_S
    holder = read_holder(workdir)
    while holder is None and time.monotonic() < deadline:  # it may be writing it right now
      time.sleep(0.05)
      holder = read_holder(workdir)
    raise errors.WorkdirLockedError(locked_message(workdir, holder)) from None
  lock = WorkdirLock(workdir=workdir, run_id=info["run_id"], fd=fd, info=info)
  _HELD.add(real)
  try:
    _write_holder(workdir, info)
  except OSError as e:
    lock.release()
    raise errors.WorkdirNotWritableError(f"cannot write to workdir {workdir}: {e}") from e
  return lock


# ------------------------------------------------------------------------------ all processes
def _encode(decision: dict[str, Any]) -> np.ndarray:
  """The decision as zero-padded JSON bytes (a too long message is cut to fit)."""
  raw = json.dumps(decision).encode()
  while len(raw) > PAYLOAD_BYTES:
    message = decision.get("message", "")
    decision = dict(decision, message=message[:len(message) // 2] + " ...")
    raw = json.dumps(decision).encode()
  out = np.zeros(PAYLOAD_BYTES, np.uint8)
  out[:len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def _decode(payload: np.ndarray) -> dict[str, Any]:
  return json.loads(bytes(np.asarray(payload, np.uint8)).rstrip(b"\0").decode())


def acquire(
    workdir: str, *, create: bool = True, mode: str = "",
    check: Callable[[], None] | None = None, process_index: int | None = None,
    process_count: int | None = None, broadcast: Broadcast | None = None,
) -> WorkdirLock:
  """Takes the lock of `workdir` for this run (process 0) and shares the decision with the run.

  `create`: make the workdir if missing (train); otherwise a missing workdir is not locked (the
  mode fails on it with its own message). `check` runs on process 0 under the lock (e.g. that
  results.json can be written); its user error refuses the run on every process. Raises
  WorkdirLockedError when another run holds the workdir, naming it.
  `process_index` / `process_count` / `broadcast` default to jax's (tests replace them).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  broadcast = broadcast or multihost_utils.broadcast_one_to_all
  lock, failure = None, None
  decision: dict[str, Any] = {"status": "ok", "run_id": ""}
  if process_index == 0:
    run_id = uuid.uuid4().hex[:12]
    decision["run_id"] = run_id
    try:
      if not workdir:
        raise errors.ConfigError("--workdir is empty")
      if create or os.path.isdir(workdir):
        info = dict(holder_info(workdir, mode, run_id), process_count=process_count)
        lock = _lock_here(workdir, create, info)
        if check is not None:
          check()
      else:
        decision["status"] = "skipped"
    except Exception as e:  # pylint: disable=broad-except
      if lock is not None:
        lock.release()
      failure = e
      decision = {"status": "locked" if isinstance(e, errors.WorkdirLockedError) else "error",
                  "message": errors.message_of(e), "run_id": run_id}
  if process_count > 1:
    mine = _encode(decision) if process_index == 0 else np.zeros(PAYLOAD_BYTES, np.uint8)
    decision = _decode(broadcast(mine))
  if failure is not None:
    raise failure
  if decision["status"] == "locked":
    raise errors.WorkdirLockedError(f"(process 0) {decision['message']}")
  if decision["status"] == "error":
    raise errors.StmnError(f"(process 0) {decision['message']}")
  if lock is None:
    lock = WorkdirLock(workdir=workdir, run_id=decision["run_id"])
  return lock


@contextlib.contextmanager
def locked(workdir: str, **kwargs) -> Iterator[WorkdirLock]:
  """`acquire(workdir, **kwargs)` for the body; released at its end (kill -9: by the kernel).

  In a multi-host run the processes meet before process 0 lets go after a normal end, so no
  new run starts while another process of this one still writes.
  """
  lock = acquire(workdir, **kwargs)
  try:
    yield lock
    if jax.process_count() > 1 and kwargs.get("process_count") is None:
      multihost_utils.sync_global_devices(f"workdir_lock release {lock.run_id}")
  finally:
    lock.release()
