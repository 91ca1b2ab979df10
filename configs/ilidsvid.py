"""iLIDS-VID: `--config=configs/ilidsvid.py[:model][,smoke][,official]`; pick the split with
`--config.dataset.split_id=0..9`."""

from configs import common


def _dataset(config):
  config.dataset.name = "ilidsvid"
  config.dataset.root = "data/iLIDS-VID"
  config.dataset.split_id = 0
  config.dataset.num_val_ids = 0
  config.train.select_on = "none"  # no validation ids: the final weights are tested


def get_config(arg=None):
  return common.build(arg, _dataset)
