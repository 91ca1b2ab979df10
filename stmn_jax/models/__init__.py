"""Model registry: `create_model(config, num_classes, rngs)` picks `config.model.name`.

A builder is any callable `(config, num_classes, *, rngs) -> nnx.Module` (a model class with
that constructor works as is). Models are imported lazily from `_BUILDERS`; adding a model is
one line there (`"name": "module:attribute"`), or `@register("name")` on a builder.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from stmn_jax import errors
from stmn_jax.models import resnet, torchvision_weights

Builder = Callable[..., nnx.Module]

# name -> "module:attribute" (imported on first use) or a builder registered at run time.
_BUILDERS: dict[str, str | Builder] = {
    "stmn": "stmn_jax.models.stmn:build",
    "drsa": "stmn_jax.models.drsa:DRSA",
    "sta": "stmn_jax.models.sta:STA",
}


def register(name: str) -> Callable[[Builder], Builder]:
  """Decorator: `@register("mine")` on a builder `(config, num_classes, *, rngs) -> Module`."""

  def wrap(builder: Builder) -> Builder:
    _BUILDERS[name] = builder
    return builder

  return wrap


def available() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def get_builder(name: str) -> Builder:
  if name not in _BUILDERS:
    raise ValueError(f"config.model.name: unknown model {name!r}; expected one of {available()}")
  entry = _BUILDERS[name]
  if isinstance(entry, str):
    module_name, attr = entry.split(":")
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      raise ValueError(f"model {name!r}: its module {module_name} is not available ({e})") from e
    entry = getattr(module, attr)
    _BUILDERS[name] = entry
  return entry


def load_pretrained(model: nnx.Module, path: str) -> int:
  """Copy a torchvision ResNet state dict into every `ResNetTrunk` (stem + layer1-3) and
  every `ResNetStage` (as layer4) of `model`, in place. Returns the number of parts loaded."""
  field = f"config.model.pretrained={path!r}"
  try:
    state_dict = torchvision_weights.load_state_dict(path)
  except (OSError, torchvision_weights.WeightLoadError) as e:
    raise errors.ConfigError(f"{field}: {e}") from e
  loaded = 0
  try:
    for _, module in nnx.iter_modules(model):
      if isinstance(module, resnet.ResNetTrunk):
        torchvision_weights.load_into_trunk(module, state_dict)
        loaded += 1
      elif isinstance(module, resnet.ResNetStage):
        torchvision_weights.load_into_stage(module, state_dict, prefix="layer4")
        loaded += 1
  except torchvision_weights.WeightLoadError as e:
    raise errors.ConfigError(
        f"{field} does not fit the model's backbone (config.model.depth / width): {e}\n"
        "(use a file made for this backbone, or --config.model.pretrained= to train from "
        "scratch)") from e
  if not loaded:
    raise errors.ConfigError(f"{field}: the model has no ResNet trunk or stage to load into")
  return loaded


def create_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    rngs: nnx.Rngs,
    *,
    load_weights: bool = True,
) -> nnx.Module:
  """Build `config.model.name` for `num_classes` identities; if `config.model.pretrained` is
  set (and `load_weights`), load that torchvision file into the backbone parts."""
  model = get_builder(config.model.name)(config, num_classes, rngs=rngs)
  pretrained = config.model.get("pretrained", "")
  if pretrained and load_weights:
    load_pretrained(model, pretrained)
  return model


def count_parameters(model: Any) -> dict[str, dict[str, int]]:
  """Per top-level part: {variable type name ('Param', 'BatchStat', 'FrozenBias', ...): number
  of scalars}. Works on abstract models from `nnx.eval_shape` (nothing is allocated)."""
  counts: dict[str, dict[str, int]] = {}
  for name, child in nnx.iter_children(model):
    part: dict[str, int] = {}
    leaves = jax.tree.leaves(nnx.state(child), is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var in leaves:
      kind = type(var).__name__
      part[kind] = part.get(kind, 0) + math.prod(var.shape)
    counts[str(name)] = part
  return counts
