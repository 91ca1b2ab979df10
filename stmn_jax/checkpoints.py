"""Orbax checkpoints (V0 `CheckpointManager`): the latest-N and the best checkpoint of a run.

Two managers under the workdir:
- `WORKDIR/checkpoints`: periodic, evaluation-step and final saves, the last `keep` kept;
  training resumes from the newest one. Each step holds two items: `default` (the state,
  `args.StandardSave`) and `selection` (`args.JsonSave`, `SelectionState`: the validation
  history, the best step and score, the loss history). Both are committed together (one
  atomic rename of the step folder; in a bucket, where a rename is a copy, orbax writes the
  step in place and commits it with a `commit_success.txt` object), so a resumed run knows
  exactly which evaluations up to its step are done and which checkpoint is the best, and
  which selection options made them (`stmn_jax/selection.py`). Checkpoints of older versions
  have no `selection` item: `restore_selection` returns None for them.
- `WORKDIR/best`: one checkpoint, the best by the selection metric and tie rule
  (`config.train.select_metric`, `select_ties`; on the split `select_on`), its metrics stored
  by orbax. The caller decides which step is the best; `best/` keeps every save until the new
  one is committed, then deletes the others (orbax's own `best_fn`, mAP, never decides which
  one stays). Where a kill left two, the newest is the best (`best_step`): a step is only ever
  saved there as a new best.

Ordering (what makes a kill at any moment recoverable, `train.py`): a `best/` save of step s is
only started once `checkpoints/s` (whose selection state names s as the best) is committed, and a
`checkpoints/` save only starts once the pending `best/` save is committed. So `best/` never
holds a step newer than the newest committed `checkpoints/` step, and the best named by that
step's selection state is either committed in `best/` or is that very step (re-saved from it on
resume, `ensure_best`).

Saves run in the background. `check_for_errors()` (cheap, non-blocking; called after every
training step) and every wait raise a `CheckpointError` naming the checkpoint, its path and the
OS error as soon as a background save has failed. Unfinished saves leave
`*.orbax-checkpoint-tmp*` folders: orbax never lists them as steps, and a writable
`Checkpointer` deletes them when it is created (do not open one on a workdir that a running
training writes to).

A state tree is `{"model": ..., "optimizer": ..., "step": int64[], "rng": uint32[2]}` of pure
dicts (`nnx.to_pure_dict`). Restores go into a *concrete* target (arrays already placed with
their shardings), never an `nnx.eval_shape` one made under `jax.set_mesh`: orbax cannot restore
into `AbstractMesh` shardings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from stmn_jax import errors
from stmn_jax import selection as selection_lib
from stmn_jax import workdir_io

BEST_METRIC = "mAP"  # the default selection metric (and the only one of older versions)
STATE_ITEM = "default"  # the item name orbax gives a single-item checkpoint (older versions)
SELECTION_ITEM = "selection"
# 2 adds `options` (the selection options); version 1 states (no options) are still read.
SELECTION_VERSION = 2
READABLE_SELECTION_VERSIONS = (1, 2)


class CheckpointError(errors.CheckpointError):
  """A checkpoint could not be written, or a workdir's checkpoints are inconsistent (a user
  error: `main.py` prints its one-line message; a RuntimeError)."""


def is_finite_tree(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is free of NaN / Inf."""
  for leaf in jax.tree.leaves(tree):
    dtype = getattr(leaf, "dtype", np.asarray(leaf).dtype)
    if jnp.issubdtype(dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
      return False
  return True


def scalar_metrics(metrics: dict) -> dict[str, float]:
  """The scalar entries of `metrics` as floats (what `best/` stores with a checkpoint)."""
  return {k: float(v) for k, v in metrics.items() if np.isscalar(v) or np.ndim(v) == 0}


def _error_reason(exc: BaseException) -> str:
  """One line: the first OS error in `exc`'s chain (errno, message, file), else its message."""
  seen: BaseException | None = exc
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      where = f": {seen.filename}" if seen.filename else ""
      return f"[Errno {seen.errno}] {seen.strerror or os.strerror(seen.errno)}{where}"
    seen = seen.__cause__ or seen.__context__
  text = " ".join(str(exc).split())
  if len(text) > 600:
    text = text[:600] + " ..."
  return f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------------ selection state
@dataclasses.dataclass
class SelectionState:
  """What model selection and results.json depend on, saved with every latest checkpoint.

  `history`: `[{"step": s, <label>: results}]` of the evaluations done (JSON-ready);
  `best_step` / `best_metrics`: the best evaluation so far (scalar metrics) or None;
  `loss_history`: `[(step, loss)]` of the logged steps; `train`: the last fetched train metrics;
  `options`: the selection options (`selection.options`) the evaluations were made with (None:
  a state of an older version, which recorded none). `known` is False for a checkpoint of an
  older version without this item: then the history is lost and the best is what `best/` holds
  (`Checkpointer.legacy_selection`).
  """

  history: list[dict] = dataclasses.field(default_factory=list)
  best_step: int | None = None
  best_metrics: dict[str, float] | None = None
  loss_history: list[tuple[int, float]] = dataclasses.field(default_factory=list)
  train: dict[str, float] = dataclasses.field(default_factory=dict)
  options: dict[str, Any] | None = None
  known: bool = True

  def is_better(self, metrics: dict, metric: str = BEST_METRIC, ties: str = "first") -> bool:
    """True when `metrics[metric]` replaces the best so far: strictly higher (`ties` "first",
    `>`) or at least as high ("last", `>=`; `selection.is_better`)."""
    for m, name in ((metrics, "model selection"), (self.best_metrics, "the best so far")):
      if m is not None and metric not in m:
        raise KeyError(f"{name} needs metric {metric!r}, got {sorted(m)}")
    best = None if self.best_metrics is None else float(self.best_metrics[metric])
    return selection_lib.is_better(float(metrics[metric]), best, ties)

  def evaluated_steps(self) -> list[int]:
    return [int(h["step"]) for h in self.history]

  def to_json(self) -> dict:
    return {
        "version": SELECTION_VERSION,
        "history": self.history,
        "best_step": self.best_step,
        "best_metrics": self.best_metrics,
        "loss_history": [[int(s), float(v)] for s, v in self.loss_history],
        "train": self.train,
        "options": self.options,
    }

  @classmethod
  def from_json(cls, d: dict) -> SelectionState:
    if int(d.get("version", 0)) not in READABLE_SELECTION_VERSIONS:
      raise CheckpointError(f"selection state version {d.get('version')!r}: expected one of "
                            f"{READABLE_SELECTION_VERSIONS}")
    best_step = d.get("best_step")
    options = d.get("options")
    return cls(
        history=list(d.get("history") or []),
        best_step=None if best_step is None else int(best_step),
        best_metrics=d.get("best_metrics"),
        loss_history=[(int(s), float(v)) for s, v in d.get("loss_history") or []],
        train=dict(d.get("train") or {}),
        options=None if options is None else dict(options),
    )


def _join(folder: str, name: str) -> str:
  """`folder/name` through epath (a local path or a `gs://` URI), as a string."""
  return str(epath.Path(folder) / name)


# ------------------------------------------------------------------------------ checkpointer
class Checkpointer:
  """Latest-N (with selection state) and best checkpoints of one training run."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"config.train.keep_checkpoints = {keep}: expected >= 1")
    # Path strings (absolute; a gs:// workdir as it is): orbax takes them as epath.Paths.
    self.workdir = str(workdir_io.workdir_path(workdir))
    self.latest_dir = _join(self.workdir, "checkpoints")
    self.best_dir = _join(self.workdir, "best")
    self.read_only = read_only
    # Multi-item manager: mode fixed here, so the step folders' contents never switch it (a
    # state-only folder of an older version restores through the same `Composite` args).
    self._latest = ocp.CheckpointManager(
        self.latest_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only,
        ),
        item_names=(STATE_ITEM, SELECTION_ITEM),
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            SELECTION_ITEM: ocp.JsonCheckpointHandler(),
        },
    )
    # No max_to_keep: orbax would keep the best by `best_fn` (mAP), not the selected one; the
    # older steps are deleted once a new best is committed (`_wait`). `best_fn` makes orbax
    # store the metrics.
    self._best = ocp.CheckpointManager(
        self.best_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None,
            best_fn=lambda m: float(m[BEST_METRIC]),
            best_mode="max",
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        ),
    )
    # The save of each manager that was started and not yet checked: (step, final path).
    self._unchecked: dict[str, tuple[int, str]] = {}

  def _manager(self, which: str) -> ocp.CheckpointManager:
    if which not in ("latest", "best"):
      raise ValueError(f"checkpoint {which!r}: expected 'latest' or 'best'")
    return self._latest if which == "latest" else self._best

  def _dir(self, which: str) -> str:
    return self.latest_dir if which == "latest" else self.best_dir

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    """The best checkpoint: the newest step in `best/` (one, but for a kill mid-replacement)."""
    steps = self.best_steps()
    return max(steps) if steps else None

  def best_steps(self) -> list[int]:
    """Every committed step in `best/` (normally one)."""
    return list(self._best.all_steps())

  def best_metrics(self, step: int | None = None) -> dict | None:
    """The stored metrics of the best checkpoint (or of `step`); None when there is none."""
    self._wait("best")  # metrics of an in-flight save are not readable yet
    step = self.best_step() if step is None else step
    if step is None:
      return None
    return dict(self._best.metrics(step) or {})

  def has_selection(self, step: int) -> bool:
    """Whether latest checkpoint `step` holds a selection state (False: an older version)."""
    return (epath.Path(self.latest_dir) / str(step) / SELECTION_ITEM).is_dir()

  # ------------------------------------------------------------------ errors
  def _raise(self, which: str, step: int | None, exc: BaseException) -> None:
    path = _join(self._dir(which), str(step)) if step is not None else self._dir(which)
    what = f"{which} checkpoint of step {step}" if step is not None else f"{which} checkpoint"
    raise CheckpointError(f"saving the {what} to {path} failed: {_error_reason(exc)}") from exc

  def _wait(self, which: str) -> None:
    """Waits for `which`'s background save; a CheckpointError if it failed. Once a `best/`
    save is committed, the other steps in `best/` are deleted (a failed one keeps them)."""
    step = self._unchecked.pop(which, (None, ""))[0]
    try:
      self._manager(which).wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise(which, step, e)
    if which == "best" and step is not None:
      try:
        for s in self.best_steps():
          if s != step:
            self._best.delete(s)
      # The new best is committed; an older step left behind is harmless (`best_step` takes the
      # newest, `ensure_best` removes the rest on resume), so a failed delete must neither stop
      # training nor hide an exception already on its way out.
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("could not delete an older step of %s: %s", self.best_dir, e)

  def check_for_errors(self) -> None:
    """Raises a CheckpointError if a background save has failed (never blocks)."""
    for which in list(self._unchecked):
      if not self._manager(which).is_saving_in_progress():
        self._wait(which)  # finished: returns at once, or raises its error

  # ------------------------------------------------------------------ saving
  def save(self, step: int, tree: Any, selection: SelectionState | None = None) -> bool:
    """Saves `tree` (and `selection`) as step `step` in the latest manager.

    Refuses non-finite trees; returns False when `step` is already saved. Waits first for a
    pending best save (so a committed latest step implies the best it names is committed).
    """
    if not is_finite_tree(tree):
      raise FloatingPointError(f"refusing to save a non-finite state at step {step}")
    self._wait("best")
    self._wait("latest")
    if step in self._latest.all_steps():
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(tree)}
    if selection is not None:
      items[SELECTION_ITEM] = ocp.args.JsonSave(selection.to_json())
    try:
      saved = self._latest.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise("latest", step, e)
    self._unchecked["latest"] = (step, _join(self.latest_dir, str(step)))
    return saved

  def save_best(self, step: int, tree: Any, metrics: dict) -> None:
    """Saves `tree` as the best checkpoint of step `step`, replacing every other in `best/`.

    The caller decided that `step` is the best (any metric, any tie rule); the other steps are
    deleted once it is committed (`_wait`), so a failed save keeps the previous best. Waits
    first for the pending latest save: `best/` must never get ahead of `checkpoints/`.
    """
    if BEST_METRIC not in metrics:
      raise KeyError(f"best checkpoint needs metric {BEST_METRIC!r}, got {sorted(metrics)}")
    if not is_finite_tree(tree):
      raise FloatingPointError(f"refusing to save a non-finite state at step {step}")
    self._wait("latest")
    self._wait("best")
    if step in self._best.all_steps():
      self._best.delete(step)
    try:
      self._best.save(step, args=ocp.args.StandardSave(tree), metrics=scalar_metrics(metrics),
                      force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise("best", step, e)
    self._unchecked["best"] = (step, _join(self.best_dir, str(step)))

  # ------------------------------------------------------------------ resume
  def restore_selection(self, step: int) -> SelectionState | None:
    """The selection state saved with latest checkpoint `step`; None for an older version."""
    if not self.has_selection(step):
      return None
    restored = self._latest.restore(
        step, args=ocp.args.Composite(**{SELECTION_ITEM: ocp.args.JsonRestore()}))
    return SelectionState.from_json(dict(restored[SELECTION_ITEM]))

  def legacy_selection(self, step: int) -> SelectionState:
    """An 'unknown' selection state for latest checkpoint `step` of an older version: the best
    is the best of `best/` up to `step` (later ones, made after `step` by the killed run, are
    deleted: the resumed run redoes those evaluations); the history is lost."""
    later = [s for s in self.best_steps() if s > step]
    for s in later:
      self._best.delete(s)
    best = self.best_step()
    metrics = None if best is None else self.best_metrics(best)
    if metrics is not None and BEST_METRIC not in metrics:
      best, metrics = None, None
    return SelectionState(best_step=best, best_metrics=metrics, known=False)

  def ensure_best(self, selection: SelectionState, step: int, tree: Any) -> None:
    """Makes `best/` hold exactly the best that `selection` (restored with latest checkpoint
    `step`, whose state is `tree`) names: other steps are deleted; a best of `step` itself
    that was never committed (killed run) is saved again from `tree`."""
    for s in self.best_steps():
      if s != selection.best_step:
        self._best.delete(s)
    b = selection.best_step
    if b is None or b in self.best_steps():
      return
    if b != step:
      raise CheckpointError(
          f"{_join(self.best_dir, str(b))}: the best checkpoint named by "
          f"{_join(self.latest_dir, str(step))} is missing")
    self.save_best(step, tree, selection.best_metrics or {})

  # ------------------------------------------------------------------ restoring
  def restore(self, target: Any, which: str = "latest", step: int | None = None) -> Any:
    """Restores into the structure / shardings of the concrete `target` pytree.

    `which` is "latest" or "best"; raises FileNotFoundError when there is no checkpoint.
    """
    mngr = self._manager(which)
    if step is None:
      step = mngr.latest_step() if which == "latest" else self.best_step()
    if step is None:
      raise errors.CheckpointNotFoundError(f"no {which} checkpoint in {self._dir(which)}")
    if which == "best":
      return mngr.restore(step, args=ocp.args.StandardRestore(target))
    restored = mngr.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))
    return restored[STATE_ITEM]

  def wait(self) -> None:
    """Waits for the background saves; a CheckpointError if one failed."""
    self._wait("latest")
    self._wait("best")

  def close(self, quiet: bool = False) -> None:
    """Waits for the background saves and closes; a failed save raises a CheckpointError
    (with `quiet`, e.g. while another error propagates, it is only logged)."""
    failures = []
    for which in ("latest", "best"):
      try:
        self._wait(which)
      except CheckpointError as e:
        failures.append(e)
    self._latest.close()
    self._best.close()
    for e in failures[1 if not quiet else 0:]:
      logging.error("%s", e)
    if failures and not quiet:
      raise failures[0]

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    self.close(quiet=exc_type is not None)
