"""MARS (Zheng et al., ECCV 2016): `--config=configs/mars.py[:model][,smoke]`."""

from configs import common


def _dataset(config):
  config.dataset.name = "mars"
  config.dataset.root = "data/MARS"
  config.dataset.protocol = "official"
  config.dataset.num_val_ids = 125


def get_config(arg=None):
  return common.build(arg, _dataset)
