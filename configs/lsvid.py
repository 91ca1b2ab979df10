"""LS-VID (Li et al., ICCV 2019): `--config=configs/lsvid.py[:model][,smoke][,official]`."""

from configs import common


def _dataset(config):
  config.dataset.name = "lsvid"
  config.dataset.root = "data/LS-VID"
  config.dataset.num_val_ids = 168


def get_config(arg=None):
  return common.build(arg, _dataset)
