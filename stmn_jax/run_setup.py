"""What every mode sets up before work starts: config checks, the mesh, the splits, the classes.

`prepare_run(config)` is the one place where a run's fields are checked, the device mesh is
made and the batch sizes are checked against it, and the dataset is read (with the validation
identities held out of the training ids) — so that bad input stops every mode the same way,
before any compilation or training. TF-free at import: the readers only list files, and the
frame check loads TensorFlow only to decode frames it has not seen decode before.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from jax.sharding import Mesh

import data_pipelines
from data_pipelines import frame_check
from data_pipelines import sampling
from data_pipelines import tracklets as tracklets_lib
from stmn_jax import errors
from stmn_jax import selection
from stmn_jax import sharding

EVAL_SAMPLINGS = ("rrs", "all_frames", "whole")


# ------------------------------------------------------------------------------ config checks
def check_eval_sampling(config: ml_collections.ConfigDict) -> None:
  if config.eval.sampling not in EVAL_SAMPLINGS:
    raise errors.ConfigError(
        f"config.eval.sampling = {config.eval.sampling!r}: expected one of {EVAL_SAMPLINGS}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Training and evaluation fields checked before any work starts (ConfigError); the model
  selection's with the training ids they need (`selection.check`)."""
  check_eval_sampling(config)
  t = config.train
  for name in ("log_every_steps", "checkpoint_every_steps", "eval_every_epochs"):
    if t[name] < 1:
      raise errors.ConfigError(f"config.train.{name} = {t[name]}: expected >= 1")
  selection.check(config)
  if config.optim.num_epochs < 1:
    raise errors.ConfigError(f"config.optim.num_epochs = {config.optim.num_epochs}: expected >= 1")
  if config.eval.checkpoint not in ("best", "latest"):
    raise errors.ConfigError(
        f"config.eval.checkpoint = {config.eval.checkpoint!r}: expected 'best' or 'latest'"
    )


def num_steps_per_epoch(config: ml_collections.ConfigDict, num_train_ids: int) -> int:
  """`config.optim.steps_per_epoch`, or (when -1) one pass over the training ids, floor(C / P)."""
  if config.optim.steps_per_epoch > 0:
    return int(config.optim.steps_per_epoch)
  if config.optim.steps_per_epoch != -1:
    raise errors.ConfigError(
        f"config.optim.steps_per_epoch = {config.optim.steps_per_epoch}: expected > 0 or -1"
    )
  return max(1, sampling.num_groups(num_train_ids, int(config.data.num_ids_per_batch)))


# ------------------------------------------------------------------------------ data
def with_files_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` that reads frames from files (tracklet folders are never in TFDS)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.source = "files"
  return config


def load_data(config: ml_collections.ConfigDict, split=None):
  """(train_split, selection_split or None, test split, selection label or None).

  `split` defaults to `data_pipelines.split_from_config(config)` (native files or TFDS).
  Validation ids are held out of the training ids when `config.dataset.num_val_ids > 0`;
  with 0, every training id trains. The selection split follows `config.train.select_on`:
  the held-out ids ("val"), the test split ("test") or none ("none": label None).
  """
  if split is None:
    split = data_pipelines.split_from_config(config)
  train_split, val_split = split, None
  if config.dataset.num_val_ids > 0:
    train_split, val_split = tracklets_lib.holdout_validation(
        split, config.dataset.num_val_ids, config.dataset.num_val_queries, config.seed
    )
  if config.train.select_on == "test":
    return train_split, split, split, "test"
  if config.train.select_on == "none":
    return train_split, None, split, None
  return train_split, val_split, split, "val"


def num_classes_of(train_split) -> int:
  """Training identities (the classifier's width) of a split."""
  return len({t.pid for t in train_split.train})


@dataclasses.dataclass
class RunSetup:
  """The checked set-up of a mode: mesh, splits (None when the mode reads no dataset), classes."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  train_split: data_pipelines.Split | None = None
  selection_split: data_pipelines.Split | None = None
  test_split: data_pipelines.Split | None = None
  selection: str | None = None
  num_classes: int | None = None

  @property
  def steps_per_epoch(self) -> int:
    return num_steps_per_epoch(self.config, self.num_classes)


def prepare_run(
    config: ml_collections.ConfigDict, *, mesh: Mesh | None = None, split=None,
    read_data: bool = True, frames_of: str = "run",
) -> RunSetup:
  """Checks the config, makes the mesh (or takes `mesh`), checks the batch sizes against it and
  (with `read_data`) reads the dataset (`split` replaces it: tests, notebooks).

  With `config.data.check_frames` (default True) every frame the mode reads — `frames_of`
  "run": the train, selection and test tracklets; "test": the test query and gallery — is then
  checked to decode (`data_pipelines.frame_check`, remembered in
  `config.data.frame_check_cache`), so a bad frame stops the run here, named with its tracklet.
  Frames from files only: TFDS records were encoded (so decoded) by their builder.
  """
  check_config(config)
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_config(config, mesh)
  setup = RunSetup(config=config, mesh=mesh)
  if read_data:
    train_split, sel_split, test_split, sel_label = load_data(config, split)
    setup.train_split, setup.selection_split, setup.test_split = train_split, sel_split, test_split
    setup.selection = sel_label
    setup.num_classes = num_classes_of(train_split)
    if config.data.get("source", "files") == "files" and config.data.get("check_frames", True):
      parts = frame_check.run_parts(train_split, sel_split, test_split, sel_label)
      if frames_of == "test":
        parts = [(label, ts) for label, ts in parts if label.startswith("test ")]
      elif frames_of != "run":
        raise ValueError(f"frames_of={frames_of!r}: expected 'run' or 'test'")
      frame_check.check_tracklets(parts, cache_dir=config.data.get("frame_check_cache", ""))
  return setup
