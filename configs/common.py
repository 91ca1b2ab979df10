"""Parsing of the config argument `file.py:word,word` and the model / smoke presets.

`configs/<dataset>.py:get_config(arg)` calls `build(arg, dataset=...)`, which starts from the
paper's settings (`configs/default.py`), applies the dataset's settings, then the words:
a model name (see `MODEL_PRESETS`, default `stmn`) and `smoke` for a tiny CPU run.
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

# Option words. `smoke` works for every dataset config; the others only for a dataset config
# that passes a function for them to `build(..., options=...)` (e.g. `ablation` in synthetic.py).
OPTION_WORDS = ("smoke", "ablation")


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

  `options` maps dataset-specific option words (other than `smoke`) to the function that applies
  them, after the model preset; a word this dataset config does not define raises a ValueError.
  """
  model, words = parse_arg(arg)
  options = options or {}
  unsupported = sorted(w for w in words if w != "smoke" and w not in options)
  if unsupported:
    raise ValueError(
        f"config word(s) {unsupported} are not defined for this dataset config "
        f"(it defines: {', '.join(['smoke', *options]) })"
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
  config.arg = arg or ""
  return config
