"""MARS (Zheng et al., ECCV 2016): `--config=configs/mars.py[:model][,smoke][,official]`.

`configs/mars.py:stmn,official` is the authors' released run (cvlab-yonsei/STMN `train.sh`): all
625 ids train and the checkpoint is picked on the test set; every field it sets is in
`configs/common.py:OFFICIAL_FIELDS` (docs/FAITHFULNESS.md). As for the paper default, pass
torchvision's ImageNet ResNet-50 with `--config.model.pretrained=resnet50.pth`.
"""

from configs import common


def _dataset(config):
  config.dataset.name = "mars"
  config.dataset.root = "data/MARS"
  config.dataset.protocol = "official"
  config.dataset.num_val_ids = 125


def get_config(arg=None):
  return common.build(arg, _dataset)
