"""Parsing of the config argument `file.py:word,word` and the model / smoke presets.

`configs/<dataset>.py:get_config(arg)` calls `build(arg, dataset=...)`, which starts from the
paper's settings (`configs/default.py`), applies the dataset's settings, then the words:
a model name (see `MODEL_PRESETS`, default `stmn`), `smoke` for a tiny CPU run and `official`
for the authors' released run (`OFFICIAL_FIELDS`; docs/FAITHFULNESS.md).
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from configs import default

# Model presets: each sets config.model.name and the ablation flags (paper Table 1).
# Words: stmn (full), baseline, sm / tm (one memory), *_nospread (no memory spread loss).
MODEL_PRESETS: dict[str, dict] = {
    "stmn": dict(name="stmn", spatial_memory=True, temporal_memory=True, spread_loss=True),
    "stmn_nospread": dict(name="stmn", spatial_memory=True, temporal_memory=True, spread_loss=False),
    "sm": dict(name="stmn", spatial_memory=True, temporal_memory=False, spread_loss=True),
    "sm_nospread": dict(name="stmn", spatial_memory=True, temporal_memory=False, spread_loss=False),
    "tm": dict(name="stmn", spatial_memory=False, temporal_memory=True, spread_loss=True),
    "tm_nospread": dict(name="stmn", spatial_memory=False, temporal_memory=True, spread_loss=False),
    "baseline": dict(name="stmn", spatial_memory=False, temporal_memory=False, spread_loss=False),
    "drsa": dict(name="drsa"),
    "sta": dict(name="sta"),
}

# Option words. `smoke` and `official` work for every dataset config (`GENERIC_WORDS`); the
# others only for a dataset config that passes a function for them to `build(..., options=...)`
# (e.g. `ablation` in synthetic.py).
GENERIC_WORDS = ("smoke", "official")
OPTION_WORDS = (*GENERIC_WORDS, "ablation")

# The `official` word: the behaviours of the authors' released run (cvlab-yonsei/STMN: train.sh,
# main.py, util/utils.py, model/memory.py, model/network.py) where they differ from the paper,
# one config field each (docs/FAITHFULNESS.md sets each against the paper default). Only
# behaviours, never sizes: the word leaves batch, L, frame size, epochs, steps and the evaluation
# interval to the defaults (which are train.sh's: 8 ids x 4 tracklets x L = 6 at 256x128, Adam
# lr 1e-4 with coupled weight decay 1e-5, x0.1 every 50 epochs, 200 epochs, an evaluation every
# 10 epochs) and to `smoke` and overrides, so it composes with both. ImageNet weights are a file
# (`--config.model.pretrained=...`, torchvision's resnet50 as main.py loads), never downloaded.
# The authors released a MARS run only; on the other datasets the word applies the same code
# behaviours to that dataset's settings.
OFFICIAL_FIELDS: dict[str, object] = {
    # The three model switches (model/resnet.py, model/memory.py at HEAD 9e0c8e8).
    "model.stem_relu": False,  # conv1 -> bn1 -> maxpool, no ReLU
    "model.smem_layout": "nchw_flat",  # key_s reshaped (-1, 2048) without the NHWC permute
    "model.memory_similarity": "code",  # F.normalize(key.t(), dim=1): keys normalised over slots
    # Item 1: train.sh trains on all ids (no hold-out).
    "dataset.num_val_ids": 0,
    # Item 2: main.py keeps the best R1 on the test set (`if cmc >= best_cmc`), scored by
    # test_rrs (one clip: the first frame of each of the L chunks, no flip), never after the last
    # epoch; the epochs scored are `train.eval_epoch_offset` (`apply_official`).
    "train.select_on": "test",
    "train.select_metric": "R1",
    "train.select_ties": "last",
    "train.select_sampling": "rrs",
    "train.select_flip": "off",
    "train.eval_at_end": False,
    # Item 3: nn.DataParallel on gpu_id '0,1,2': BN statistics and mem_trip per chunk of the batch
    # (torch.chunk: 32 -> 11/11/10); replica 0's chunk updates the running statistics.
    "model.bn_groups": 3,
    "model.bn_running_stats": "first_group",
    # Item 4: main.py:test_all pads a tracklet shorter than L with its current second-to-last
    # frame (n = 3, L = 6: 0 1 2 1 2 1).
    "eval.short_padding": "official",
    # Item 5: nn.LSTM's two bias vectors, bias_ih and bias_hh.
    "model.lstm_biases": 2,
    # Item 6: PyTorch's BatchNorm keeps the unbiased batch variance as running variance.
    "model.bn_running_var": "unbiased",
    # Item 7: util/utils.py:RandomErasing draws the aspect ratio from U(0.3, 1 / 0.3).
    "data.erasing_aspect": (0.3, 1 / 0.3),
}
# Item 2, the epochs scored: main.py's loop `for epoch in range(1, n_epochs + 1)` runs test_rrs
# when (epoch + 1) % eval_freq == 0 BEFORE training epoch `epoch`, so it scores the weights after
# c = epoch - 1 completed epochs, every c with (c + 2) % eval_freq == 0: 8, 18, ..., 198 of 200
# for eval_freq 10. `train.eval_epoch_offset` is that 2 modulo the interval, kept as a reference
# to `train.eval_every_epochs` so that `smoke` (an interval of 1) and a command-line interval stay
# official.
OFFICIAL_EVAL_LAG = 2
# The official code is STMN's: the word applies to the presets of model "stmn" only.
OFFICIAL_MODELS = ("stmn",)


def parse_arg(arg: str | None) -> tuple[str, set[str]]:
  """'baseline,smoke' -> ('baseline', {'smoke'}). Unknown words raise a ValueError."""
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  model, options = "stmn", set()
  models_seen = []
  for w in words:
    if w in MODEL_PRESETS:
      models_seen.append(w)
    elif w in OPTION_WORDS:
      options.add(w)
    else:
      raise ValueError(
          f"unknown config word {w!r}: expected a model ({', '.join(MODEL_PRESETS)}) "
          f"or an option ({', '.join(OPTION_WORDS)})"
      )
  if len(models_seen) > 1:
    raise ValueError(f"config names more than one model: {models_seen}")
  if models_seen:
    model = models_seen[0]
  return model, options


def apply_model_preset(config: ml_collections.ConfigDict, model: str) -> None:
  preset = MODEL_PRESETS[model]
  config.model.preset = model
  config.model.name = preset["name"]
  for key in ("spatial_memory", "temporal_memory"):
    if key in preset:
      config.model[key] = preset[key]
  if "spread_loss" in preset:
    config.loss.spread_weight = 1.0 if preset["spread_loss"] else 0.0
  model_defaults = default.MODEL_DEFAULTS.get(preset["name"])
  if model_defaults:
    model_defaults(config)


def apply_cpu_size(
    config: ml_collections.ConfigDict,
    *,
    width: float,
    ids_per_batch: int,
    tracklets_per_id: int,
    eval_batch_size: int,
) -> None:
  """The CPU size of the smoke run and the synthetic benchmark's jobs: a ResNet-18 at `width`
  from scratch (no pretrained file), 64x32 frames, clips of L = 4, batches of P x K tracklets."""
  config.model.depth = 18
  config.model.width = width
  config.model.pretrained = ""
  config.data.height = 64
  config.data.width = 32
  config.data.seq_len = 4
  config.data.num_ids_per_batch = ids_per_batch
  config.data.num_tracklets_per_id = tracklets_per_id
  config.data.eval_batch_size = eval_batch_size


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets `config.<dotted>`; a field that `configs/default.py` does not define is a KeyError
  naming it (so a renamed field cannot be set silently as a new one)."""
  *parents, name = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  if name not in node:
    raise KeyError(f"config.{dotted}: no such field in configs/default.py")
  node[name] = value


def apply_official(config: ml_collections.ConfigDict) -> None:
  """The `official` word: every field of `OFFICIAL_FIELDS`, and `train.eval_epoch_offset` as
  `OFFICIAL_EVAL_LAG` modulo `train.eval_every_epochs` (a reference: it follows the interval
  until the offset itself is overridden). Refuses a model whose registry name
  is not STMN's (DRSA, STA): the released code is STMN's, so there is no official run of them."""
  if config.model.name not in OFFICIAL_MODELS:
    allowed = [w for w, p in MODEL_PRESETS.items() if p["name"] in OFFICIAL_MODELS]
    raise ValueError(
        f"config word 'official' reproduces the released STMN code (cvlab-yonsei/STMN) and "
        f"needs an STMN model word ({', '.join(allowed)}); got {config.model.preset!r} (model "
        f"{config.model.name!r}), which has no official run"
    )
  for dotted, value in OFFICIAL_FIELDS.items():
    set_field(config, dotted, value)
  every = config.train.get_ref("eval_every_epochs")
  config.train.eval_epoch_offset = (every + OFFICIAL_EVAL_LAG) % every


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """A tiny configuration that runs end to end on a 2-core CPU in seconds."""
  apply_cpu_size(config, width=0.125, ids_per_batch=4, tracklets_per_id=2, eval_batch_size=8)
  config.data.shuffle_buffer = 16
  config.optim.num_epochs = 2
  config.optim.steps_per_epoch = 4
  config.optim.decay_every_epochs = 1
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 4
  config.train.eval_every_epochs = 1
  config.model.spatial_slots = 4
  config.model.temporal_slots = 3


def build(
    arg: str | None,
    dataset: Callable[[ml_collections.ConfigDict], None],
    smoke_dataset: Callable[[ml_collections.ConfigDict], None] | None = None,
    options: dict[str, Callable[[ml_collections.ConfigDict], None]] | None = None,
) -> ml_collections.ConfigDict:
  """The paper's defaults, then the dataset's settings, then the words of `arg`.

  `options` maps dataset-specific option words (other than `smoke` and `official`) to the
  function that applies them, after the model preset; a word this dataset config does not define
  raises a ValueError. `smoke` comes next (sizes), `official` last (behaviours only), so that
  `official` wins over a dataset's smoke hold-out and `smoke`'s sizes stay.
  """
  model, words = parse_arg(arg)
  options = options or {}
  unsupported = sorted(w for w in words if w not in GENERIC_WORDS and w not in options)
  if unsupported:
    raise ValueError(
        f"config word(s) {unsupported} are not defined for this dataset config "
        f"(it defines: {', '.join([*GENERIC_WORDS, *options]) })"
    )
  config = default.get_config()
  dataset(config)
  apply_model_preset(config, model)
  for word in options:
    if word in words:
      options[word](config)
  if "smoke" in words:
    apply_smoke(config)
    if smoke_dataset is not None:
      smoke_dataset(config)
  if "official" in words:
    apply_official(config)
  config.arg = arg or ""
  return config
