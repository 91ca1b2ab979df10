"""DukeMTMC-VideoReID: `--config=configs/dukev.py[:model][,smoke][,official]`."""

from configs import common


def _dataset(config):
  config.dataset.name = "dukev"
  config.dataset.root = "data/DukeMTMC-VideoReID"
  config.dataset.num_val_ids = 140


def get_config(arg=None):
  return common.build(arg, _dataset)
