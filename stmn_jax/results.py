"""Run results: `WORKDIR/results.json`, JSON-ready values, scalars for the metric writers.

Where a summary is written (`write_results`, process 0 only, through `ranking.json_ready`,
atomically: a temporary file renamed over results.json); `check_writable` probes that it can be,
before a mode's work starts. The table a mode prints is `ranking.format_table`.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from stmn_jax import errors
from stmn_jax import ranking

RESULTS_FILE = "results.json"


def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def check_writable(workdir: str) -> None:
  """Raises WorkdirNotWritableError unless `WORKDIR/results.json` can be written.

  Probes by opening it for appending (nothing written; a probe file that did not exist is
  removed), so it also fails for root on a read-only filesystem or when the path is a folder.
  """
  path = results_path(workdir)
  existed = os.path.lexists(path)
  try:
    open(path, "a").close()  # opened for appending: nothing is written
    if not existed:
      os.remove(path)
  except OSError as e:
    raise errors.WorkdirNotWritableError(f"cannot write {path}: {e}") from e


def write_results(workdir: str, summary: Mapping[str, Any]) -> str:
  """Writes `summary` to `WORKDIR/results.json` (process 0); returns the path.

  Raises WorkdirNotWritableError (naming the path and the OS error) when it cannot.
  """
  path = results_path(workdir)
  if jax.process_index() == 0:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
      with open(tmp, "w") as f:
        json.dump(ranking.json_ready(summary), f, indent=2, sort_keys=True)
      os.replace(tmp, path)
    except OSError as e:
      raise errors.WorkdirNotWritableError(f"cannot write {path}: {e}") from e
    finally:
      with contextlib.suppress(OSError):
        os.remove(tmp)
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
