"""The project's error types: errors a user can fix, which `main.py` reports in one message.

Every type here derives from `StmnError` and from the builtin type raised before it existed
(`ConfigError` is a `ValueError`, `CheckpointNotFoundError` a `FileNotFoundError`, ...), so
code and tests that catch the builtin types keep working. The data layer's
`data_pipelines.readers.common.DatasetError` is a user error too; the data layer knows nothing
of this package (imports go downward: stmn_jax -> data_pipelines), so the tuple `USER_ERRORS`
names both bases and `report_user_errors` catches it.

`main.py` prints a user error's message and exits 1 without the traceback; `--verbose` or the
environment variable `STMN_VERBOSE=1` shows the traceback. Any other exception keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

from data_pipelines.readers.common import DatasetError

T = TypeVar("T")
VERBOSE_ENV = "STMN_VERBOSE"


class StmnError(Exception):
  """An error the user can fix (config, checkpoint, workdir, training diverged)."""


class ConfigError(StmnError, ValueError):
  """A config field, flag or command-line override that cannot work."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
  """The `--config` file does not exist."""


class CheckpointError(StmnError, RuntimeError):
  """A workdir's checkpoint cannot be restored."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The workdir does not exist or holds no checkpoint (train first)."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """A checkpoint that is not of the configured model (or not a model checkpoint at all)."""


class NonFiniteLossError(StmnError, FloatingPointError):
  """Training diverged: a non-finite loss or gradient norm."""


class WorkdirLockedError(StmnError, RuntimeError):
  """Another run holds the workdir (`stmn_jax.workdir_lock`)."""


class WorkdirNotWritableError(StmnError, OSError):
  """The workdir (or a file the run must write in it) cannot be written."""


USER_ERRORS: tuple[type[Exception], ...] = (StmnError, DatasetError)


def verbose_from_env() -> bool:
  """True when `STMN_VERBOSE` is set to 1 / true / yes (any case)."""
  return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def message_of(error: BaseException) -> str:
  """The text a user error is reported with: its message, else its type name."""
  return str(error) or type(error).__name__


def report_user_errors(fn: Callable[[], T], *, verbose: bool = False, prog: str = "main.py") -> T:
  """Returns `fn()`; a user error (`USER_ERRORS`) prints `prog: message` to stderr and exits 1.

  With `verbose` user errors propagate (traceback included); other exceptions always do.
  """
  try:
    return fn()
  except USER_ERRORS as e:
    if verbose:
      raise
    sys.stdout.flush()
    print(f"{prog}: {message_of(e)}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
