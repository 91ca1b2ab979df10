"""Evaluators picked by name, as big_vision's are: `from_config(state, config, mesh)`.

An evaluator is a small module holding a class `Evaluator(state, config, mesh)` whose
`run(state, query, gallery) -> dict` scores a model state on query / gallery tracklets. The
table maps a name (`config.eval.evaluator`, default "retrieval") to its module, imported only
when used; a new evaluator is one file and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections
from jax.sharding import Mesh

from stmn_jax import errors

DEFAULT = "retrieval"
EVALUATORS = {
    "retrieval": "stmn_jax.evaluators.retrieval",
}


def from_config(state: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """The evaluator `config.eval.evaluator` names (default "retrieval"), built for `state`."""
  name = config.eval.get("evaluator", DEFAULT)
  if name not in EVALUATORS:
    raise errors.ConfigError(f"config.eval.evaluator = {name!r}: expected one of "
                     f"{', '.join(sorted(EVALUATORS))}")
  return importlib.import_module(EVALUATORS[name]).Evaluator(state, config, mesh)
