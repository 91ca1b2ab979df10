"""Orbax checkpoints (V0 `CheckpointManager`, `args.StandardSave` / `StandardRestore`).

Two managers under the workdir:
- `WORKDIR/checkpoints`: periodic and final saves, the last `keep` kept; training resumes from
  the newest one;
- `WORKDIR/best`: one checkpoint, the best by the selection metric (validation mAP, or test mAP
  when `config.train.select_on == "test"`), with its metrics stored by orbax (`best_fn`).

A checkpoint is a pytree `{"model": ..., "optimizer": ..., "step": int64[], "rng": uint32[2]}`
of pure dicts (`nnx.to_pure_dict`). Restores go into a *concrete* target (arrays already placed
with their shardings), never an `nnx.eval_shape` one made under `jax.set_mesh`: orbax cannot
restore into `AbstractMesh` shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

BEST_METRIC = "mAP"


def is_finite_tree(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is free of NaN / Inf."""
  for leaf in jax.tree.leaves(tree):
    dtype = getattr(leaf, "dtype", np.asarray(leaf).dtype)
    if jnp.issubdtype(dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
      return False
  return True


class Checkpointer:
  """Latest-N and best checkpoints of one training run."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"config.train.keep_checkpoints = {keep}: expected >= 1")
    self.workdir = os.path.abspath(workdir)
    self.latest_dir = os.path.join(self.workdir, "checkpoints")
    self.best_dir = os.path.join(self.workdir, "best")
    self._latest = ocp.CheckpointManager(
        self.latest_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only
        ),
    )
    self._best = ocp.CheckpointManager(
        self.best_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1,
            best_fn=lambda m: float(m[BEST_METRIC]),
            best_mode="max",
            create=not read_only,
            read_only=read_only,
        ),
    )

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.best_step()

  def best_metrics(self) -> dict | None:
    """The stored metrics of the best checkpoint (None when there is none)."""
    self._best.wait_until_finished()  # metrics of an in-flight save are not readable yet
    step = self._best.best_step()
    if step is None:
      return None
    return dict(self._best.metrics(step) or {})

  # ------------------------------------------------------------------ saving
  def save(self, step: int, tree: Any) -> bool:
    """Saves `tree` as step `step` in the latest manager (refuses non-finite trees)."""
    if not is_finite_tree(tree):
      raise FloatingPointError(f"refusing to save a non-finite state at step {step}")
    if step in self._latest.all_steps():
      return False
    return self._latest.save(step, args=ocp.args.StandardSave(tree), force=True)

  def maybe_save_best(self, step: int, tree: Any, metrics: dict) -> bool:
    """Saves `tree` in `best/` if `metrics[BEST_METRIC]` beats the stored best."""
    if BEST_METRIC not in metrics:
      raise KeyError(f"best checkpoint needs metric {BEST_METRIC!r}, got {sorted(metrics)}")
    value = float(metrics[BEST_METRIC])
    best = self.best_metrics()
    if best is not None and value <= float(best[BEST_METRIC]):
      return False
    if not is_finite_tree(tree):
      raise FloatingPointError(f"refusing to save a non-finite state at step {step}")
    stored = {k: float(v) for k, v in metrics.items() if np.isscalar(v) or np.ndim(v) == 0}
    if step in self._best.all_steps():
      self._best.wait_until_finished()
      self._best.delete(step)
    self._best.save(step, args=ocp.args.StandardSave(tree), metrics=stored, force=True)
    return True

  # ------------------------------------------------------------------ restoring
  def restore(self, target: Any, which: str = "latest", step: int | None = None) -> Any:
    """Restores into the structure / shardings of the concrete `target` pytree.

    `which` is "latest" or "best"; raises FileNotFoundError when there is no checkpoint.
    """
    if which not in ("latest", "best"):
      raise ValueError(f"checkpoint {which!r}: expected 'latest' or 'best'")
    mngr = self._latest if which == "latest" else self._best
    if step is None:
      step = mngr.latest_step() if which == "latest" else mngr.best_step()
    if step is None:
      directory = self.latest_dir if which == "latest" else self.best_dir
      raise FileNotFoundError(f"no {which} checkpoint in {directory}")
    return mngr.restore(step, args=ocp.args.StandardRestore(target))

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
