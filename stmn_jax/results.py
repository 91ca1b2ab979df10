"""Run results: `WORKDIR/results.json`, JSON-ready values, scalars for the metric writers.

Where a summary is written (`write_results`, process 0 only, through `ranking.json_ready`);
the table a mode prints is `ranking.format_table`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from stmn_jax import ranking

RESULTS_FILE = "results.json"


def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def write_results(workdir: str, summary: Mapping[str, Any]) -> str:
  """Writes `summary` to `WORKDIR/results.json` (process 0); returns the path."""
  path = results_path(workdir)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(ranking.json_ready(summary), f, indent=2, sort_keys=True)
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
