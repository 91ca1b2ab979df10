"""Parameter counts per model part: `python -m stmn_jax.models --config=configs/mars.py[:preset]`.

The model is built with `nnx.eval_shape` (shapes only, no weights loaded), so this is instant
even for ResNet-50. "torch-equivalent" is what `sum(p.numel() for p in model.parameters())`
gives for the PyTorch model: the trainable parameters, plus the frozen BNNeck biases (PyTorch
counts them as parameters with requires_grad=False) and, per one-bias LSTM
(`config.model.lstm_biases = 1`), the second bias vector PyTorch keeps (b_ih and b_hh; with
`lstm_biases = 2` the model has both). BatchNorm buffers (running mean and variance; PyTorch
also keeps a `num_batches_tracked` scalar per BN) are not parameters and are not in it.
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from stmn_jax import models
from stmn_jax.models import memory

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as the program (importing
  `summarize`, as the tests do, must not define a global `--config` that main.py defines too)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py[:words]).")
  flags.DEFINE_integer(
      "num_classes", 625,
      "Training identities C (MARS: 625; 500 with the 125-id validation hold-out).")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def summarize(config, num_classes: int) -> dict:
  """Counts for `config`: parts, total trainable, other variables, torch-equivalent total."""
  model = nnx.eval_shape(
      lambda: models.create_model(config, num_classes, nnx.Rngs(0), load_weights=False))
  parts = models.count_parameters(model)
  trainable = sum(p.get("Param", 0) for p in parts.values())
  frozen = sum(p.get("FrozenBias", 0) for p in parts.values())
  lstm_extra = sum(
      4 * m.dim for _, m in nnx.iter_modules(model)
      if isinstance(m, memory.TemporalMemory) and m.lstm_biases == 1)
  return dict(
      model=config.model.name, preset=config.model.get("preset", ""), num_classes=num_classes,
      parts=parts, trainable=trainable,
      buffers=sum(v for p in parts.values() for k, v in p.items() if k != "Param"),
      torch_equivalent=trainable + frozen + lstm_extra)


def main(argv: Sequence[str]) -> None:
  del argv
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/mars.py:baseline")
  s = summarize(config, FLAGS.num_classes)
  if FLAGS.json:
    print(json.dumps(s))
    return
  m = config.model
  print(f"model={s['model']} preset={s['preset']} depth={m.depth} width={m.width} "
        f"C={s['num_classes']}")
  print(f"{'part':<24}{'params':>14}{'other vars':>14}")
  for name, p in s["parts"].items():
    other = sum(v for k, v in p.items() if k != "Param")
    print(f"{name:<24}{p.get('Param', 0):>14,}{other:>14,}")
  print(f"{'total trainable':<24}{s['trainable']:>14,}{s['buffers']:>14,}")
  print(f"torch-equivalent parameter count: {s['torch_equivalent']:,} "
        f"({s['torch_equivalent'] / 1e6:.2f} M)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
