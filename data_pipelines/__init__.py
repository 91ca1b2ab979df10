"""Data layer: native dataset readers, the synthetic benchmark, sampling and tf.data pipelines.

Knows nothing of models. `get_split(dataset_config)` is the one entry point the engine uses to
turn `config.dataset` into a `Split` (train / query / gallery tracklets).
"""

from __future__ import annotations

from data_pipelines.tracklets import Split, Tracklet  # noqa: F401


def get_split(dataset_config) -> Split:
  """`config.dataset` -> Split, through the reader registered under `dataset_config.name`.

  For `synthetic`, the benchmark is generated first (deterministically, once per root and
  settings) in the MARS or DukeV layout, and then read by that layout's real reader.
  """
  from data_pipelines import readers  # pylint: disable=g-import-not-at-top

  return readers.read_from_config(dataset_config)
