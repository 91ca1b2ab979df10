"""Workdir paths and files through `etils.epath`: a workdir may be local or in an object store.

A Cloud TPU run keeps its workdir in a bucket (`--workdir=gs://bucket/run`). Python's `os`,
`open` and `shutil` see such a string as a relative local path, so every read and write inside
a workdir goes through `epath.Path` instead: local paths go to the OS, `gs://` (and `s3://`,
`az://`) to `tf.io.gfile` when TensorFlow is installed (it is, in requirements.txt), to fsspec
otherwise. Orbax takes the same `epath.Path`s, and clu's TensorBoard writer takes the workdir
string (tf.summary handles `gs://` itself). `os`, `open` and `shutil` are left to dataset
files, user inputs and temporary files; `tests/test_workdir_paths.py` enforces it.

Atomic writes (`write_text_atomic`): locally a temporary file beside the target renamed over it;
in an object store one write of the object, which is atomic there (a reader sees the old object
or the new one, never a part), while a rename would be a copy plus a delete.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Union

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # the URI schemes epath knows
PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
  """Whether `path` is on a local (or mounted) filesystem, not an object-store URI."""
  return not os.fspath(path).startswith(REMOTE_PREFIXES)


def workdir_path(workdir: PathLike) -> epath.Path:
  """`workdir` as an `epath.Path`: a local one made absolute, a URI (`gs://...`) as it is."""
  path = os.fspath(workdir)
  return epath.Path(os.path.abspath(path) if is_local(path) else path)


def io_errors() -> tuple[type[BaseException], ...]:
  """The exceptions a failed workdir read or write raises: OSError, plus TensorFlow's OpError
  once TensorFlow is loaded (tf.io.gfile, epath's backend for `gs://`, raises it for e.g. a
  permission error). TensorFlow is never imported here: the training core stays TF-free."""
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None)
  return (OSError,) + ((errors.OpError,) if errors is not None else ())


def write_text_atomic(path: PathLike, text: str) -> epath.Path:
  """Writes `text` to `path` so that no reader ever sees a part of it (module docstring).

  Locally: a temporary file `NAME.<pid>.tmp` beside it, renamed over it (removed on failure).
  In an object store: one write of the object. Returns the path.
  """
  path = epath.Path(path)
  if not is_local(path):
    path.write_text(text)
    return path
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(text)
    tmp.replace(path)
  finally:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
  return path
