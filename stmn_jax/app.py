"""What `main.py` runs: `run(config, workdir, mode)` and the mode registry.

Modes are plain functions `(config, workdir) -> dict` registered by name; adding one (export,
extract, search, visualize, ...) is a `@register_mode("name")` function here or in a module
imported from here, and `main.py --mode=name` picks it up.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Callable, Sequence

import jax
import ml_collections
from absl import logging

ModeFn = Callable[[ml_collections.ConfigDict, str], dict]
MODES: dict[str, ModeFn] = {}


def register_mode(name: str) -> Callable[[ModeFn], ModeFn]:
  def wrap(fn: ModeFn) -> ModeFn:
    if name in MODES:
      raise ValueError(f"mode {name!r} registered twice")
    MODES[name] = fn
    return fn

  return wrap


def _quiet_orbax(record) -> bool:
  """absl log filter: orbax's per-save INFO chatter is dropped, its warnings kept."""
  return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train", **options) -> dict:
  """Runs `mode` ("train", "eval", ...) on `config` in `workdir`; returns its summary dict.

  `options` are the mode's own keyword arguments (e.g. `export_dir` for export).
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: expected one of {', '.join(sorted(MODES))}")
  if _quiet_orbax not in logging.get_absl_logger().filters:
    logging.get_absl_logger().addFilter(_quiet_orbax)
  logging.info(
      "process %d/%d, %d local / %d global devices: %s", jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count(), jax.local_devices(),
  )
  logging.info("mode %s, workdir %s, config:\n%s", mode, workdir, config)
  return MODES[mode](config, workdir, **options)


@register_mode("train")
def train_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if `workdir` has checkpoints), evaluates, writes results.json."""
  from stmn_jax import train  # pylint: disable=g-import-not-at-top

  _, summary = train.train_and_evaluate(config, workdir)
  return summary


@register_mode("eval")
def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores the best (or latest: `config.eval.checkpoint`) checkpoint, evaluates on test.

  Without training checkpoints, the parameters `--mode=export` wrote (`W/export/params`).
  """
  from stmn_jax import export  # pylint: disable=g-import-not-at-top
  from stmn_jax import sharding  # pylint: disable=g-import-not-at-top
  from stmn_jax import train  # pylint: disable=g-import-not-at-top

  train.check_config(config)
  mesh = sharding.make_mesh()
  sharding.check_batch_config(config, mesh)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--mode=eval: workdir {workdir} does not exist (train first)")
  train_split, _, test_split, _ = train.load_data(config)
  num_classes = len({t.pid for t in train_split.train})
  state, label, step = export.restore_model(config, workdir, mesh, num_classes=num_classes)
  results = train.evaluate_tracklets(state, test_split.query, test_split.gallery, config, mesh)
  print(f"\nTest results ({label}):\n{train.format_results(results)}", flush=True)
  summary = {"mode": "eval", "test_checkpoint": label, "step": step, "test": results}
  train.write_results(workdir, summary)
  return summary


# Modes defined in other modules register themselves on import.
# pylint: disable-next=g-import-not-at-top,wrong-import-position,unused-import
from stmn_jax import export as _export
# pylint: disable-next=g-import-not-at-top,wrong-import-position,unused-import
from stmn_jax import retrieval as _retrieval
# pylint: disable-next=g-import-not-at-top,wrong-import-position,unused-import
from stmn_jax import visualize as _visualize


# ------------------------------------------------------------------------------ flags helpers
def default_workdir(config_arg: str) -> str:
  """`configs/synthetic.py:baseline,smoke` -> `workdir/synthetic_baseline_smoke`."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  words = [w.strip() for w in arg.split(",") if w.strip()]
  return os.path.join("workdir", "_".join([name, *words]))


def load_config_file(config_arg: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` as config_flags does (its `get_config(arg)`)."""
  path, sep, arg = config_arg.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={config_arg}: no config file {path}")
  spec = importlib.util.spec_from_file_location("_stmn_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config={config_arg}: {path} has no get_config()")
  return module.get_config(arg) if sep else module.get_config()


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
  """Raises a ValueError naming the first `--config.<key>` override that is not in the config.

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
        raise ValueError(
            f"unknown config key --config.{key}: {where} has no field {part!r}"
            + (f" (did you mean {where}.{hint[0]}?)" if hint else "")
            + (f"; its fields: {', '.join(sorted(fields))}" if fields else "")
        )
      node = node[part]
      walked.append(part)
