"""Prepare a dataset as TFDS ArrayRecord files:

    python -m data_pipelines.tfds_builders --config=configs/mars.py --data_dir=/data/tfds \
        [--manual_dir=/data/MARS]

The builder variant follows the config (`config.dataset.protocol`, `split_id`, synthetic knobs);
`--manual_dir` defaults to `config.dataset.root`, `--data_dir` to `config.data.tfds_data_dir`.
Prints the split sizes, then a JSON line.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (file.py:words).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: config.data.tfds_data_dir).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Native layout (default: config.dataset.root).")


def main(argv):
  del argv
  from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  builder = tfds_builders.prepare(config, manual_dir=_MANUAL_DIR.value or None,
                                  data_dir=_DATA_DIR.value or None)
  sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
  print(f"{builder.name}/{builder.builder_config.name} in {builder.data_dir}: {sizes}")
  print(json.dumps({"builder": builder.name, "config": builder.builder_config.name,
                    "data_dir": str(builder.data_dir), "splits": sizes}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
