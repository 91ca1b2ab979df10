"""Model selection options: which split, metric, tie rule, evaluation protocol and epochs pick
the checkpoint that the final test scores (`config.train.select_*`, `config.train.eval_*`).

The paper's protocol is the default: identities held out of the training ids
(`dataset.num_val_ids`) scored by mAP under `config.eval`'s protocol every
`eval_every_epochs` epochs and after the last one, the first of equal scores kept. The official
code's (docs/FAITHFULNESS.md rows 1-2): every training id trains (`num_val_ids = 0`), the test
set scored by R1 with one RRS clip per tracklet and no flip, after 8, 18, ..., 198 of 200
epochs (`main.py` scores before training its 1-based epochs 9, 19, ..., 199: offset 2; never
after the last), the later of equal scores kept.

Pure functions of the config (no JAX, no TF): `check` (ConfigError before work starts),
`eval_epochs` / `eval_steps` (the schedule), `eval_config` (the config the selection evaluator
is built from), `is_better` (metric and tie rule), `options` (what results.json and every
checkpoint's selection state record) and `check_resumable` (a resumed run refuses options that
differ from those its checkpoints were selected with).
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from stmn_jax import errors

SPLITS = ("val", "test", "none")
METRICS = ("mAP", "R1")
TIES = ("first", "last")
SAMPLINGS = ("eval", "rrs", "all_frames", "whole")
FLIPS = ("eval", "on", "off")
# The options that must not change when a run resumes (the rest of `options` is derived).
RESUME_KEYS = ("split", "num_val_ids", "metric", "ties", "sampling", "flip",
               "eval_every_epochs", "eval_epoch_offset", "eval_at_end")
# What the versions before these options did (their checkpoints record no options).
LEGACY_OPTIONS = {"metric": "mAP", "ties": "first", "eval_epoch_offset": 0, "eval_at_end": True}


def _expect(name: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise errors.ConfigError(
        f"config.{name} = {value!r}: expected one of {', '.join(map(repr, allowed))}")


def check(config: ml_collections.ConfigDict) -> None:
  """ConfigError for a bad selection field or a split that the training ids cannot give."""
  t = config.train
  _expect("train.select_on", t.select_on, SPLITS)
  _expect("train.select_metric", t.select_metric, METRICS)
  _expect("train.select_ties", t.select_ties, TIES)
  _expect("train.select_sampling", t.select_sampling, SAMPLINGS)
  _expect("train.select_flip", t.select_flip, FLIPS)
  if not isinstance(t.eval_at_end, bool):
    raise errors.ConfigError(f"config.train.eval_at_end = {t.eval_at_end!r}: expected a bool")
  if t.eval_every_epochs < 1:
    raise errors.ConfigError(
        f"config.train.eval_every_epochs = {t.eval_every_epochs}: expected >= 1")
  if not 0 <= t.eval_epoch_offset < t.eval_every_epochs:
    raise errors.ConfigError(
        f"config.train.eval_epoch_offset = {t.eval_epoch_offset}: expected 0 .. "
        f"eval_every_epochs - 1 = {t.eval_every_epochs - 1}")
  num_val = config.dataset.num_val_ids
  if t.select_on == "val" and num_val <= 0:
    raise errors.ConfigError(
        f"config.train.select_on = 'val' needs validation ids, but config.dataset.num_val_ids = "
        f"{num_val}: hold some out (num_val_ids > 0), select on the test set (select_on = "
        "'test'), or test the final weights (select_on = 'none')")
  if t.select_on == "none" and num_val > 0:
    raise errors.ConfigError(
        f"config.train.select_on = 'none' uses no validation ids, but config.dataset.num_val_ids"
        f" = {num_val} would hold them out of training: set num_val_ids = 0")
  if t.select_on != "none" and not eval_epochs(config):
    raise errors.ConfigError(
        f"config.train.select_on = {t.select_on!r} scores no epoch: none of 1 .. "
        f"optim.num_epochs = {config.optim.num_epochs} has (epoch + eval_epoch_offset = "
        f"{t.eval_epoch_offset}) a multiple of eval_every_epochs = {t.eval_every_epochs}, and "
        "eval_at_end is False: the final weights would be tested under a selection label "
        "(lower eval_every_epochs, set eval_at_end = True, or select_on = 'none')")


def eval_epochs(config: ml_collections.ConfigDict) -> list[int]:
  """The numbers of completed epochs after which the selection split is scored.

  Every e in 1..num_epochs with (e + eval_epoch_offset) a multiple of eval_every_epochs, and
  num_epochs itself when `eval_at_end`; none when `select_on == "none"`.
  """
  t, n = config.train, int(config.optim.num_epochs)
  if t.select_on == "none":
    return []
  every, offset = int(t.eval_every_epochs), int(t.eval_epoch_offset)
  epochs = [e for e in range(1, n + 1) if (e + offset) % every == 0]
  if t.eval_at_end and n not in epochs:
    epochs.append(n)
  return epochs


def eval_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
  """`eval_epochs` in completed training steps."""
  return [e * steps_per_epoch for e in eval_epochs(config)]


def sampling(config: ml_collections.ConfigDict) -> str:
  """The sampling of the selection evaluations: `select_sampling`, or `config.eval.sampling`."""
  s = config.train.select_sampling
  return config.eval.sampling if s == "eval" else s


def flip(config: ml_collections.ConfigDict) -> bool:
  """Whether the selection evaluations average with the flip: `select_flip`, or `eval.flip`."""
  f = config.train.select_flip
  return bool(config.eval.flip) if f == "eval" else f == "on"


def eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose `eval.sampling` / `eval.flip` are the selection's (the config the
  selection evaluator is built from; the final test keeps `config.eval`)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.eval.sampling, out.eval.flip = sampling(config), flip(config)
  return out


def same_protocol(config: ml_collections.ConfigDict) -> bool:
  """Whether the selection evaluations embed as the final test does (one evaluator serves)."""
  return sampling(config) == config.eval.sampling and flip(config) == bool(config.eval.flip)


def is_better(score: float, best: float | None, ties: str) -> bool:
  """Whether `score` replaces the best so far: strictly higher (`ties == "first"`, `>`: the
  first of equal scores stays) or at least as high (`"last"`, `>=`: the later one wins)."""
  if best is None:
    return True
  return score >= best if ties == "last" else score > best


def options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The selection a run uses, JSON-ready (results.json, checkpoints' selection state)."""
  t = config.train
  return {
      "split": t.select_on,
      "num_val_ids": int(config.dataset.num_val_ids),
      "metric": t.select_metric,
      "ties": t.select_ties,
      "sampling": sampling(config),
      "flip": flip(config),
      "eval_every_epochs": int(t.eval_every_epochs),
      "eval_epoch_offset": int(t.eval_epoch_offset),
      "eval_at_end": bool(t.eval_at_end),
      "eval_epochs": eval_epochs(config),
  }


def check_resumable(saved: Mapping[str, Any] | None, current: Mapping[str, Any],
                    where: str) -> None:
  """CheckpointError when `current` options differ from the `saved` ones (those the checkpoint
  at `where` was selected with; None: an older version, which used `LEGACY_OPTIONS`).

  Resuming with other options would mix two selections: the evaluations and the best kept so
  far were made under the old ones, so the selected checkpoint would depend on where the run
  was stopped. Only the options a checkpoint records (or the older version fixed) are compared.
  """
  saved = LEGACY_OPTIONS if saved is None else saved
  keys = RESUME_KEYS
  if saved.get("split") == current["split"] == "none":  # nothing is selected: only the ids count
    keys = ("split", "num_val_ids")
  changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in keys
             if k in saved and saved[k] != current[k]]
  if changed:
    raise errors.CheckpointError(
        f"{where} was selected with other model-selection options ({'; '.join(changed)}): "
        "resuming would mix two selections; set them back or use a new workdir")
