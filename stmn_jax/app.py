"""What `main.py` runs: `run(config, workdir, mode)` over a lazy table of modes, and the checks
of the command line's config arguments.

A mode is a function `(config, workdir, **options) -> dict` named in `MODES` as
`"module:function"`; its module is imported only when the mode runs (the pattern of
`stmn_jax/models/__init__.py`), so no mode module imports this one and a new mode is one
module plus one line here.

One run per workdir: every mode writes into its workdir (train: checkpoints, best/, logs,
results.json; eval: results.json; export: export/params (and the SavedModel by default);
extract: features/; search: search/; visualize: visualize/), so `run` takes the workdir's
lock (`workdir_lock`) for all of them before any work starts — before the mode's module is
even imported — and lets go at the end. Only train creates a missing workdir; the other modes
leave a missing one alone and fail on it with their own message. The modes that write
results.json (train, eval) check first that it can be written.

The workdir may be local or in a bucket (`--workdir=gs://bucket/run`, a Cloud TPU run): every
mode reads and writes it through `etils.epath` (`workdir_io`), orbax and clu, never through
`os` / `open` (tests/test_workdir_paths.py); the lock of an object-store workdir is a lock
object with a heartbeat (`workdir_lock`).
"""

from __future__ import annotations

import difflib
import importlib
import os
from typing import Callable, Sequence

import jax
import ml_collections
from absl import logging

from stmn_jax import errors
from stmn_jax.config_files import load_config_file  # re-exported: tests and benchmarks use app's
from stmn_jax import results as results_lib
from stmn_jax import workdir_lock

ModeFn = Callable[..., dict]
MODES: dict[str, str] = {
    "train": "stmn_jax.train:train_mode",
    "eval": "stmn_jax.eval_mode:eval_mode",
    "export": "stmn_jax.export:export_mode",
    "extract": "stmn_jax.extract:extract_mode",
    "search": "stmn_jax.retrieval:search_mode",
    "visualize": "stmn_jax.visualize:visualize_mode",
}
CREATES_WORKDIR = ("train",)  # the other modes need a trained workdir
WRITES_RESULTS = ("train", "eval")  # results.json, checked writable before the work


def check_mode(name: str) -> None:
  """Raises a ConfigError unless `name` is a mode of `MODES`."""
  if name not in MODES:
    raise errors.ConfigError(f"--mode={name!r}: expected one of {', '.join(sorted(MODES))}")


def get_mode(name: str) -> ModeFn:
  """The function of mode `name`, its module imported on first use."""
  check_mode(name)
  module_name, attr = MODES[name].split(":")
  return getattr(importlib.import_module(module_name), attr)


def _quiet_orbax(record) -> bool:
  """absl log filter: orbax's per-save INFO chatter is dropped, its warnings kept."""
  return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train", **options) -> dict:
  """Runs `mode` ("train", "eval", ...) on `config` in `workdir`; returns its summary dict.

  `options` are the mode's own keyword arguments (e.g. `export_dir` for export). Holds the
  workdir's lock for the whole run (module docstring): raises WorkdirLockedError, naming the
  other run, when one holds it.
  """
  check_mode(mode)
  check = (lambda: results_lib.check_writable(workdir)) if mode in WRITES_RESULTS else None
  with workdir_lock.locked(workdir, create=mode in CREATES_WORKDIR, mode=mode, check=check):
    fn = get_mode(mode)
    if _quiet_orbax not in logging.get_absl_logger().filters:
      logging.get_absl_logger().addFilter(_quiet_orbax)
    logging.info(
        "process %d/%d, %d local / %d global devices: %s", jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count(), jax.local_devices(),
    )
    logging.info("mode %s, workdir %s, config:\n%s", mode, workdir, config)
    return fn(config, workdir, **options)


# ------------------------------------------------------------------------------ flags helpers
def default_workdir(config_arg: str) -> str:
  """`configs/synthetic.py:baseline,smoke` -> `workdir/synthetic_baseline_smoke`."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  words = [w.strip() for w in arg.split(",") if w.strip()]
  return os.path.join("workdir", "_".join([name, *words]))


def config_overrides(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """(the --config value or None, the dotted keys of every `--config.<key>` override)."""
  config_arg, keys = None, []
  for i, a in enumerate(argv):
    if a == "--":
      break
    if a.startswith("--config="):
      config_arg = a[len("--config="):]
    elif a == "--config" and i + 1 < len(argv):
      config_arg = argv[i + 1]
    elif a.startswith("--config."):
      keys.append(a[len("--config."):].split("=", 1)[0])
  return config_arg, keys


def check_config_overrides(argv: Sequence[str], default_config: str) -> None:
  """Raises a ConfigError naming the first `--config.<key>` override that is not in the config.

  config_flags would fail on it too, but with a traceback that names only the last path part.
  """
  config_arg, keys = config_overrides(argv)
  if not keys:
    return
  config = load_config_file(config_arg or default_config)
  for key in keys:
    node, walked = config, []
    for part in key.split("."):
      fields = node.keys() if isinstance(node, (ml_collections.ConfigDict, dict)) else ()
      if part not in fields:
        where = "config" + "".join(f".{w}" for w in walked)
        hint = difflib.get_close_matches(part, list(fields), n=1)
        raise errors.ConfigError(
            f"unknown config key --config.{key}: {where} has no field {part!r}"
            + (f" (did you mean {where}.{hint[0]}?)" if hint else "")
            + (f"; its fields: {', '.join(sorted(fields))}" if fields else "")
        )
      node = node[part]
      walked.append(part)
