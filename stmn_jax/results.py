"""Run results: `WORKDIR/results.json`, JSON-ready values, scalars for the metric writers.

Where a summary is written (`write_results`, process 0 only, through `ranking.json_ready`,
atomically: `workdir_io.write_text_atomic`, a temporary file renamed over results.json locally,
one object write in a bucket); `check_writable` probes that it can be, before a mode's work
starts. The workdir may be local or `gs://...` (every access goes through `etils.epath`). The
table a mode prints is `ranking.format_table`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from stmn_jax import errors
from stmn_jax import ranking
from stmn_jax import workdir_io

RESULTS_FILE = "results.json"


def results_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / RESULTS_FILE


def check_writable(workdir: str, path: epath.Path | None = None) -> None:
  """Raises WorkdirNotWritableError unless `WORKDIR/results.json` (or `path`) can be written.

  Locally it probes by opening the file for appending (nothing written; a probe file that did
  not exist is removed), so it also fails for root on a read-only filesystem or when the path
  is a folder. An object store has no appending: an empty probe object is written beside it
  and removed.
  """
  path = results_path(workdir) if path is None else path
  try:
    if workdir_io.is_local(path):
      existed = path.exists()
      path.open("a").close()  # opened for appending and closed: nothing is written
      if not existed:
        path.unlink()
    else:
      probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
      probe.write_text("")
      probe.unlink()
  except workdir_io.io_errors() as e:
    raise errors.WorkdirNotWritableError(f"cannot write {path}: {e}") from e


def write_results(workdir: str, summary: Mapping[str, Any]) -> str:
  """Writes `summary` to `WORKDIR/results.json` (process 0, atomically); returns the path.

  Raises WorkdirNotWritableError (naming the path and the OS error) when it cannot.
  """
  return str(write_json(results_path(workdir), summary))


def write_json(path: epath.Path, summary: Mapping[str, Any]) -> epath.Path:
  """Writes `summary` (through `ranking.json_ready`) to `path` on process 0, atomically
  (`workdir_io.write_text_atomic`: temp file + rename locally, one object write in a bucket);
  raises WorkdirNotWritableError naming the path when it cannot. Returns `path`."""
  if jax.process_index() == 0:
    text = json.dumps(ranking.json_ready(summary), indent=2, sort_keys=True)
    try:
      workdir_io.write_text_atomic(path, text)
    except workdir_io.io_errors() as e:
      raise errors.WorkdirNotWritableError(f"cannot write {path}: {e}") from e
  return path


def scalars(prefix: str, results: Mapping[str, Any]) -> dict[str, float]:
  """The scalar entries of `results` as `{prefix_key: float}` (CMC arrays etc. left out)."""
  return {
      f"{prefix}_{k}": float(v) for k, v in results.items()
      if isinstance(v, (int, float, np.floating, np.integer)) or np.ndim(v) == 0
  }


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested config dict -> `{"a.b": value}` with str / int / float / bool values (hparams)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
    else:
      out[key] = str(v)
  return out
