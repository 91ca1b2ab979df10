"""The synthetic video re-ID benchmark (the offline default, no download):
`--config=configs/synthetic.py[:model][,smoke|,ablation]`.

The benchmark is generated into `config.dataset.root` on first use (deterministic for
`config.dataset.synthetic.seed`) in the MARS layout (or DukeV: `synthetic.layout`) and read back
by that layout's real reader. `config.dataset.synthetic` holds every generator knob; see
`data_pipelines/synthetic/spec.py` for their meaning.
"""

import os

import ml_collections

from configs import common
from data_pipelines.synthetic import spec  # the knob definitions only, not the generator


def _synthetic_knobs() -> ml_collections.ConfigDict:
  """All generator knobs with their defaults (single source: `SyntheticSpec`)."""
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


# The main job's pretrained trunk (stem, layer1-4 of its ResNet-18 at width 0.25), trained on a
# separate synthetic benchmark with disjoint identities: `python -m benchmarks.pretrain_trunk`;
# its recipe, SHA-256 and pretraining metrics are in the .json beside it.
MAIN_JOB_TRUNK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained",
                              "synthetic_trunk.npz")


def _main_job(config):
  """Training fields of the main job (README): STMN on the default benchmark in <= 3 minutes
  on an idle 2-core CPU, data generation and compile included (issue 17).

  A small backbone (ResNet-18 at width 0.25, 64x32 inputs, L = 4) started from `MAIN_JOB_TRUNK`,
  the offline stand-in for the paper's ImageNet weights (pretrained on 300 other identities
  without distractors), 20 epochs (120 steps) at lr 1e-3 with one step decay after 15, and model
  selection on identities held out of the training ids (the paper's protocol). Measured against
  the former from-scratch job (30 epochs): test mAP 60.9 / 57.2 / 58.4 at seeds 0 / 1 / 2
  against 45.5 / 53.3 / 46.0, in two thirds of the steps (docs/PERFORMANCE.md, "A three-minute
  main job"). `smoke` and `ablation` keep training from scratch (their own widths).
  """
  common.apply_cpu_size(
      config, width=0.25, ids_per_batch=8, tracklets_per_id=4, eval_batch_size=64)
  config.model.pretrained = MAIN_JOB_TRUNK
  config.optim.learning_rate = 1e-3
  config.optim.num_epochs = 20
  config.optim.decay_every_epochs = 15
  config.dataset.num_val_ids = 8
  config.dataset.num_val_queries = 40
  config.train.log_every_steps = 20
  config.train.checkpoint_every_steps = 100
  config.train.eval_every_epochs = 10


def _ablation(config):
  """The ablation size (`python -m benchmarks.ablation`, docs/RESULTS.md): 9 models x 2 benchmarks
  x 3 seeds on a 2-core CPU, so about a minute of training per run.

  The default benchmark knobs (every distractor on) rendered directly at the 64x32 input size
  into its own folder; a thin backbone (ResNet-18 width 0.125) from scratch, batches of 8 ids x 2
  tracklets, 15 epochs (105 steps) at a learning rate of 3e-3 with one step decay. No validation
  hold-out: all 60 training ids are used and the final checkpoint is evaluated (model selection
  on 8 held-out ids would cost training data and evaluation time for little at this length).
  """
  config.dataset.root = "data/synthetic_ablation"
  config.dataset.synthetic.height = 64
  config.dataset.synthetic.width = 32
  common.apply_cpu_size(
      config, width=0.125, ids_per_batch=8, tracklets_per_id=2, eval_batch_size=64)
  config.optim.learning_rate = 3e-3
  config.optim.num_epochs = 15
  config.optim.decay_every_epochs = 12
  config.dataset.num_val_ids = 0
  config.train.select_on = "none"
  config.train.log_every_steps = 15
  config.train.checkpoint_every_steps = 1000
  config.train.eval_every_epochs = 15


def _dataset_and_main_job(config):
  _dataset(config)
  _main_job(config)


def _smoke(config):
  _smoke_dataset(config)
  # Keep the validation path (hold-out, best checkpoint) in the smoke run: 2 of the 8 ids.
  config.dataset.num_val_ids = 2
  config.dataset.num_val_queries = 4


def get_config(arg=None):
  return common.build(arg, _dataset_and_main_job, _smoke, options={"ablation": _ablation})
