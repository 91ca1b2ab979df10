"""Config files named on the command line: `path.py[:words]` -> its `get_config(words)`.

Used by `app` (the early check of `--config.<key>` overrides) and by `eval_mode` (the
`--eval_config` of a cross-dataset evaluation). A low module, so that no mode module needs
`app` (which imports the modes lazily and must stay at the top of the import graph).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from stmn_jax import errors


def load_config_file(config_arg: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` as ml_collections' config_flags does (its `get_config(arg)`).

  Raises `errors.ConfigFileNotFoundError` for a missing file and `errors.ConfigError` for a file
  without `get_config`. The file is a Python config module, run as config_flags runs it.
  """
  path, sep, arg = config_arg.partition(":")
  if not os.path.isfile(path):
    raise errors.ConfigFileNotFoundError(f"--config={config_arg}: no config file {path}")
  spec = importlib.util.spec_from_file_location("_stmn_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise errors.ConfigError(f"--config={config_arg}: {path} has no get_config()")
  return module.get_config(arg) if sep else module.get_config()
