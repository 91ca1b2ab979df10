"""One run per workdir: an exclusive lock, taken before a run's work starts and held to its end.

Local and mounted workdirs (NFS) use a kernel lock; object-store workdirs (`gs://...`,
`workdir_io.is_local` False) a lock object (below).

Files in a local workdir:
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

Object stores (`gs://`): `fcntl` cannot lock an object, and epath has no conditional write
(create-if-absent), so the lock is the `.lock` object itself, holding the same JSON plus
`heartbeat_unix`:
- taking it: read `.lock`; a record whose heartbeat is younger than `STALE_S` refuses the run
  (naming the holder); otherwise (none, unreadable, or stale: the holder was killed or
  preempted) write ours, wait `SETTLE_S`, read it back, and refuse the run if another run's
  record is there now (last writer wins: of two runs that raced, the later write keeps the
  lock and the other backs off);
- holding it: a daemon thread rewrites `heartbeat_unix` every `HEARTBEAT_S`; if it finds
  another run's record (it took over a lock it thought stale) it logs an error and stops;
- releasing it: the heartbeat stops and `.lock` is deleted if it still names this run.
What remains guaranteed: reads after writes are strongly consistent on GCS, so two runs are
kept apart unless one of them takes more than `SETTLE_S` between reading `.lock` and writing
its own (a stalled process) or stops heartbeating for `STALE_S` while alive. It is a
best-effort guard against starting a second run by mistake, not a consensus protocol. After a
kill the lock object stays for up to `STALE_S` (then the next run takes it over); delete it by
hand (`gcloud storage rm WORKDIR/.lock`) to restart sooner.
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
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from stmn_jax import errors
from stmn_jax import workdir_io

LOCK_FILE = ".lock"  # JSON: the holder
FLOCK_FILE = ".lock.flock"  # what the kernel locks
PAYLOAD_BYTES = 4096  # the decision of process 0 as broadcast (JSON, zero-padded)
HOLDER_WAIT_S = 1.0  # a refused run waits this long for the holder to write `.lock`
# Object stores (module docstring): heartbeat period, age of a dead lock, read-back delay.
HEARTBEAT_S = 60.0
STALE_S = 600.0
SETTLE_S = 2.0

Broadcast = Callable[[np.ndarray], np.ndarray]

_HELD: set[str] = set()  # the workdirs this process holds (`_key`)


def _key(workdir: str) -> str:
  """What identifies a workdir in `_HELD`: its real path, or its URI in an object store."""
  if workdir_io.is_local(workdir):
    return os.path.realpath(workdir)  # a path string, not a file access
  return str(workdir_io.workdir_path(workdir))


def _lock_path(workdir: str) -> epath.Path:
  return workdir_io.workdir_path(workdir) / LOCK_FILE


@dataclasses.dataclass
class WorkdirLock:
  """A held workdir lock. Local: `fd`, the kernel-locked file; object store: `beat`, the
  heartbeat's stop event. Both None on processes other than 0, and when not locked."""

  workdir: str
  run_id: str
  fd: int | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  beat: threading.Event | None = None
  thread: threading.Thread | None = None

  @property
  def held(self) -> bool:
    return self.fd is not None or self.beat is not None

  def release(self) -> None:
    """Removes `.lock` and frees the lock (process 0; a no-op elsewhere and when released)."""
    if self.beat is not None:
      self._release_object()
    if self.fd is None:
      return
    try:
      with contextlib.suppress(FileNotFoundError):
        _lock_path(self.workdir).unlink()
    finally:
      fd, self.fd = self.fd, None
      _HELD.discard(_key(self.workdir))
      with contextlib.suppress(OSError):
        fcntl.lockf(fd, fcntl.LOCK_UN)
      os.close(fd)

  def _release_object(self) -> None:
    """Object store: stops the heartbeat and deletes `.lock` if it still names this run."""
    beat, self.beat = self.beat, None
    beat.set()
    if self.thread is not None:
      self.thread.join()
    try:
      holder = read_holder(self.workdir)
      if holder is not None and holder.get("run_id") == self.run_id:
        _lock_path(self.workdir).unlink(missing_ok=True)
    except workdir_io.io_errors() as e:
      logging.warning("workdir %s: could not remove the lock object: %s", self.workdir, e)
    finally:
      _HELD.discard(_key(self.workdir))


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
      "workdir": str(workdir_io.workdir_path(workdir)),
  }


def read_holder(workdir: str) -> dict[str, Any] | None:
  """The JSON of `WORKDIR/.lock`, or None when it is missing or unreadable."""
  try:
    info = json.loads(_lock_path(workdir).read_text())
  except (*workdir_io.io_errors(), ValueError):
    return None
  return info if isinstance(info, dict) else None


def _write_holder(workdir: str, info: dict[str, Any]) -> None:
  """Writes `.lock` atomically (`workdir_io.write_text_atomic`)."""
  workdir_io.write_text_atomic(_lock_path(workdir), json.dumps(info, indent=2, sort_keys=True)
                               + "\n")


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
  message = (f"workdir {workdir_io.workdir_path(workdir)} is in use by {_describe_holder(info)}. "
             "One run per workdir: wait for that run to end (or stop it), or pass another "
             "--workdir.")
  if not workdir_io.is_local(workdir):
    message += (f" If that run is dead, its lock object expires {_age(STALE_S)} after its last "
                f"heartbeat; delete {_lock_path(workdir)} to start sooner.")
  return message


# ------------------------------------------------------------------------------ process 0
def _lock_here(workdir: str, create: bool, info: dict[str, Any]) -> WorkdirLock:
  """Takes the lock in this process and writes `.lock` (`info`); raises WorkdirLockedError
  naming the holder when another run (or this process) holds it."""
  key = _key(workdir)
  if key in _HELD:
    raise errors.WorkdirLockedError(
        f"workdir {workdir_io.workdir_path(workdir)} is already locked by this process "
        f"(pid {os.getpid()}): one run per workdir")
  if create:
    try:
      workdir_io.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    except workdir_io.io_errors() as e:
      raise errors.WorkdirNotWritableError(f"cannot create workdir {workdir}: {e}") from e
  if not workdir_io.is_local(workdir):
    return _lock_object(workdir, info)
  try:  # a local file by construction: fcntl needs a file descriptor
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
  _HELD.add(key)
  try:
    _write_holder(workdir, info)
  except OSError as e:
    lock.release()
    raise errors.WorkdirNotWritableError(f"cannot write to workdir {workdir}: {e}") from e
  return lock


# ------------------------------------------------------------------------------ object stores
def _heartbeat_age(info: dict[str, Any]) -> float:
  """Seconds since the holder's last heartbeat (its start when it has none)."""
  last = info.get("heartbeat_unix", info.get("started_unix"))
  return time.time() - last if isinstance(last, (int, float)) else float("inf")


def _lock_object(workdir: str, info: dict[str, Any]) -> WorkdirLock:
  """Takes the lock object of an object-store workdir (module docstring); raises
  WorkdirLockedError naming the holder when a live run holds it or wins a race for it."""
  holder = read_holder(workdir)
  if holder is not None and _heartbeat_age(holder) <= STALE_S:
    raise errors.WorkdirLockedError(locked_message(workdir, holder))
  if holder is not None:
    logging.warning("workdir %s: taking over the lock of %s: no heartbeat for %s", workdir,
                    _describe_holder(holder), _age(_heartbeat_age(holder)))
  info = dict(info, heartbeat_unix=time.time())
  try:
    _write_holder(workdir, info)
  except workdir_io.io_errors() as e:
    raise errors.WorkdirNotWritableError(f"cannot write to workdir {workdir}: {e}") from e
  time.sleep(SETTLE_S)
  now = read_holder(workdir)
  if now is None or now.get("run_id") != info["run_id"]:
    raise errors.WorkdirLockedError(locked_message(workdir, now))
  lock = WorkdirLock(workdir=workdir, run_id=info["run_id"], info=info, beat=threading.Event())
  lock.thread = threading.Thread(target=_beat, args=(workdir, info, lock.beat),
                                 name=f"workdir_lock heartbeat {info['run_id']}", daemon=True)
  _HELD.add(_key(workdir))
  lock.thread.start()
  return lock


def _beat(workdir: str, info: dict[str, Any], stop: threading.Event) -> None:
  """The heartbeat of a held lock object: rewrites `heartbeat_unix` every HEARTBEAT_S until
  `stop`; stops with an error logged if another run's record replaced this one's."""
  while not stop.wait(HEARTBEAT_S):
    try:
      holder = read_holder(workdir)
      if holder is not None and holder.get("run_id") != info["run_id"]:
        logging.error("workdir %s: the lock of this run (%s) was taken over by %s; another run "
                      "may be writing to this workdir", workdir, info["run_id"],
                      _describe_holder(holder))
        return
      _write_holder(workdir, dict(info, heartbeat_unix=time.time()))
    # Any failure (an I/O error, a credentials refresh, a filesystem library's own exception)
    # is logged and the next beat tries again: a heartbeat thread that died would let the lock
    # go stale, and a second run in, while this run still writes.
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("workdir %s: lock heartbeat failed: %s", workdir, e)


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
      if create or workdir_io.workdir_path(workdir).is_dir():
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
