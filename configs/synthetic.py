"""The synthetic video re-ID benchmark (the offline default, no download):
`--config=configs/synthetic.py[:model][,smoke]`.

The benchmark is generated into `config.dataset.root` on first use (deterministic for
`config.dataset.synthetic.seed`) in the MARS layout and read back by the MARS reader.
"""

import ml_collections

from configs import common


def _synthetic_knobs() -> ml_collections.ConfigDict:
  # Filled in with the generator's knobs (data_pipelines/synthetic).
  return ml_collections.ConfigDict()


def _dataset(config):
  config.dataset.name = "synthetic"
  config.dataset.root = "data/synthetic"
  config.dataset.synthetic = _synthetic_knobs()


def _smoke_dataset(config):
  del config


def get_config(arg=None):
  return common.build(arg, _dataset, _smoke_dataset)
