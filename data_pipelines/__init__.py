"""Data layer: native dataset readers, the synthetic benchmark, sampling and tf.data pipelines.

Knows nothing of models. `split_from_config(config)` is the one entry point the engine uses to
get a `Split` (train / query / gallery tracklets), from the native layout (`get_split`) or from
prepared TFDS storage.
"""

from __future__ import annotations

from data_pipelines import readers
from data_pipelines.tracklets import Split, Tracklet  # noqa: F401


def get_split(dataset_config) -> Split:
  """`config.dataset` -> Split, through the reader registered under `dataset_config.name`.

  For `synthetic`, the benchmark is generated first (deterministically, once per root and
  settings) in the MARS or DukeV layout, and then read by that layout's real reader.
  """
  return readers.read_from_config(dataset_config)


def split_from_config(config) -> Split:
  """The full config -> Split, from the source `config.data.source` names.

  "files": the native layout through its reader (`get_split`). "tfds": the tracklet index stored
  in the prepared TFDS builder under `config.data.tfds_data_dir` (which may be remote storage);
  the native layout need not be present.
  """
  source = config.data.get("source", "files")
  if source == "files":
    return get_split(config.dataset)
  if source == "tfds":
    from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top

    return tfds_builders.read_split(config)
  raise ValueError(f"config.data.source: expected 'files' or 'tfds', got {source!r}")
