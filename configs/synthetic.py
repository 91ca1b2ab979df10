"""The synthetic video re-ID benchmark (the offline default, no download):
`--config=configs/synthetic.py[:model][,smoke]`.

The benchmark is generated into `config.dataset.root` on first use (deterministic for
`config.dataset.synthetic.seed`) in the MARS layout (or DukeV: `synthetic.layout`) and read back
by that layout's real reader. `config.dataset.synthetic` holds every generator knob; see
`data_pipelines/synthetic/spec.py` for their meaning.
"""

import ml_collections

from configs import common


def _synthetic_knobs() -> ml_collections.ConfigDict:
  """All generator knobs with their defaults (single source: `SyntheticSpec`).

  Imports only the knob definitions (standard library), not the generator.
  """
  from data_pipelines.synthetic import spec  # pylint: disable=g-import-not-at-top

  return ml_collections.ConfigDict(spec.defaults())


def _dataset(config):
  config.dataset.name = "synthetic"
  config.dataset.root = "data/synthetic"
  config.dataset.synthetic = _synthetic_knobs()


def _smoke_dataset(config):
  """A tiny benchmark (12 ids, short tracklets, 64x32 frames) in its own folder."""
  config.dataset.root = "data/synthetic_smoke"
  knobs = config.dataset.synthetic
  knobs.height = 64
  knobs.width = 32
  knobs.num_cameras = 3
  knobs.num_train_ids = 8
  knobs.num_test_ids = 4
  knobs.min_cameras_per_id = 2
  knobs.max_cameras_per_id = 2
  knobs.max_tracklets_per_camera = 2
  knobs.min_length = 1
  knobs.short_max_length = 8
  knobs.max_length = 24
  knobs.long_fraction = 0.1
  knobs.num_distractor_tracklets = 3
  knobs.num_junk_tracklets = 2


def get_config(arg=None):
  return common.build(arg, _dataset, _smoke_dataset)
