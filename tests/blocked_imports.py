"""Runs Python code in a subprocess where TensorFlow, TFDS, clu and TensorBoard are unimportable,
as on an accelerator machine that has only jax, flax, optax, numpy and ml_collections."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "tensorboard")

BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {BLOCKED!r}:
      raise ModuleNotFoundError(f"blocked for this test: {{name}}")
    return None
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -c BLOCKER + code` from the repository root, on the CPU; its completed process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
