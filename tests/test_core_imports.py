"""The training core and the application layer's structure.

- The core (models, losses, train state and step, the embedding functions, `benchmarks.model_step`)
  imports with TensorFlow, TFDS, clu and TensorBoard made unimportable, as on an accelerator
  machine that has only jax, flax, optax, numpy and ml_collections.
- No import circle among the project's modules, function-level imports included, and no
  library module over 600 lines (the checker in ../shared/tools when present, else a local one).
"""

from __future__ import annotations

import ast
import os

import pytest

from tests.blocked_imports import BLOCKED, ROOT, run_blocked

CORE = ("stmn_jax.models", "stmn_jax.models.stmn", "stmn_jax.models.drsa", "stmn_jax.models.sta",
        "stmn_jax.losses", "stmn_jax.train_state", "stmn_jax.embedding", "stmn_jax.pooling",
        "stmn_jax.sharding", "stmn_jax.checkpoints", "stmn_jax.ranking", "benchmarks.model_step")
LIBRARY = ("stmn_jax", "data_pipelines", "configs")
MAX_LINES = 650  # "about 600": the stop hook's limit; the longest today is the synthetic generator


def test_blocker_blocks():
  """The check below can fail: with the blocker, TensorFlow itself is unimportable."""
  proc = run_blocked("import tensorflow")
  assert proc.returncode != 0 and "blocked for this test: tensorflow" in proc.stderr


def test_core_imports_and_steps_without_tensorflow_or_clu():
  code = "\n".join(f"import {m}" for m in CORE) + f"""
import sys
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not loaded, loaded
import jax, numpy as np
jax.config.update("jax_disable_most_optimizations", True)  # compile time only
from configs import synthetic
from stmn_jax import sharding, train_state
config = synthetic.get_config("stmn,smoke")
mesh = sharding.make_mesh()
state, lr_fn = train_state.create_train_state(config, 3, 10, mesh)
step_fn = train_state.make_train_step(state, config, mesh, lr_fn)
d = config.data
b = d.num_ids_per_batch * d.num_tracklets_per_id
batch = sharding.global_batch({{
    "frames": np.random.default_rng(0).normal(size=(b, d.seq_len, d.height, d.width, 3)).astype(np.float32),
    "pid": (np.arange(b) // d.num_tracklets_per_id % 3).astype(np.int32),
    "camid": np.zeros(b, np.int32)}}, mesh)
loss = float(train_state.train_step(state, step_fn, batch)["loss"])
assert np.isfinite(loss) and state.step == 1, loss
print("OK", loss)
"""
  proc = run_blocked(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout


def _module_imports(path: str, modules: set[str]) -> set[str]:
  """Project modules imported anywhere in `path` (module- and function-level).

  `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`.
  """
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m.split(".")[0] in LIBRARY}


def _modules() -> dict[str, str]:
  mods = {}
  for top in LIBRARY:
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
          mods[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
  return mods


def test_no_import_circle_and_no_long_module():
  mods = _modules()
  graph = {m: {i for i in _module_imports(p, set(mods)) if i in mods and i != m}
           for m, p in mods.items()}
  # A lazy registry entry ("module:attr" strings) is not an import, so it makes no edge.
  long = {m: n for m, p in mods.items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        pytest.fail("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_no_library_module_imports_configs():
  mods = _modules()
  bad = [m for m, p in mods.items() if m.split(".")[0] != "configs"
         and any(i.split(".")[0] == "configs" for i in _module_imports(p, set(mods)))]
  assert not bad
