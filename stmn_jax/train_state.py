"""The training core: train state, optimizer and the jitted train step. No TensorFlow, no clu.

The model and optimizer live as NNX objects but the step is a plain `jax.jit` over their split
state (`nnx.split` once, `nnx.merge` inside the step): parameters, batch statistics and
optimizer state are replicated, the batch is sharded on `"data"`, the state is donated.
BatchNorm statistics and triplet mining therefore cover the global batch (no `axis_name`).
Randomness is explicit: the step's key is `fold_in(PRNGKey(config.seed), step)`.

This module imports only jax, flax, optax, numpy, ml_collections and the models / losses /
sharding modules, so a step can be built and timed on a machine without TensorFlow or clu
(`benchmarks/model_step.py`; `tests/test_core_imports.py` checks it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from stmn_jax import losses
from stmn_jax import models
from stmn_jax import sharding

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
ModelFn = Callable[[ml_collections.ConfigDict, int, nnx.Rngs], nnx.Module]


# ------------------------------------------------------------------------------ optimizer
def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Step decay: `learning_rate * decay_factor ** floor(step / (decay_every_epochs * spe))`."""
  o = config.optim
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch = {steps_per_epoch}: expected >= 1")
  if o.decay_every_epochs < 1:
    raise ValueError(f"config.optim.decay_every_epochs = {o.decay_every_epochs}: expected >= 1")
  return optax.exponential_decay(
      init_value=o.learning_rate,
      transition_steps=o.decay_every_epochs * steps_per_epoch,
      decay_rate=o.decay_factor,
      staircase=True,
  )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with coupled L2 (as `torch.optim.Adam(weight_decay=...)`) and the step schedule."""
  o = config.optim
  lr_fn = create_learning_rate_fn(config, steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(o.weight_decay),
      optax.adam(lr_fn, b1=o.b1, b2=o.b2),
  )
  return tx, lr_fn


# ------------------------------------------------------------------------------ state
@dataclasses.dataclass
class TrainState:
  """Split NNX state of a run. `model_state` / `opt_state` are replicated jax.Arrays."""

  model_def_train: Any
  model_def_eval: Any
  opt_def: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key (2,), the run's base key
  step: int  # completed optimizer steps

  def model(self, train: bool = False) -> nnx.Module:
    """A fresh NNX module holding the current state (eval mode unless `train`)."""
    return nnx.merge(self.model_def_train if train else self.model_def_eval, self.model_state)

  def checkpoint_tree(self) -> dict:
    return {
        "model": nnx.to_pure_dict(self.model_state),
        "optimizer": nnx.to_pure_dict(self.opt_state),
        "step": np.asarray(self.step, np.int64),
        "rng": self.rng,
    }

  def load_checkpoint_tree(self, tree: Mapping[str, Any]) -> None:
    """Replaces the state by a checkpoint tree (new State objects; old ones untouched)."""
    model_state = jax.tree.map(lambda x: x, self.model_state)
    opt_state = jax.tree.map(lambda x: x, self.opt_state)
    nnx.replace_by_pure_dict(model_state, tree["model"])
    nnx.replace_by_pure_dict(opt_state, tree["optimizer"])
    self.model_state, self.opt_state = model_state, opt_state
    self.step = int(np.asarray(tree["step"]))
    self.rng = tree["rng"]


def default_model_fn(config, num_classes, rngs):
  """The registry model of `config.model.name` (`models.create_model`)."""
  return models.create_model(config, num_classes, rngs)


def default_loss_fn(outputs, batch, config, rng=None):
  """`losses.total_loss`: the loss terms the config switches on."""
  return losses.total_loss(outputs, batch, config, rng=rng)


def create_train_state(
    config: ml_collections.ConfigDict,
    num_classes: int,
    steps_per_epoch: int,
    mesh: Mesh,
    model_fn: ModelFn | None = None,
) -> tuple[TrainState, optax.Schedule]:
  """Model via the registry (or `model_fn`), `nnx.Optimizer(wrt=nnx.Param)`, replicated."""
  model_fn = model_fn or default_model_fn
  base = jax.random.PRNGKey(config.seed)
  model = model_fn(config, num_classes, nnx.Rngs(jax.random.fold_in(base, 1)))
  tx, lr_fn = create_optimizer(config, steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  model.eval()
  model_def_eval = nnx.graphdef(model)
  model.train()
  model_def_train, model_state = nnx.split(model)
  opt_def, opt_state = nnx.split(optimizer)
  rep = sharding.replicated(mesh)
  state = TrainState(
      model_def_train=model_def_train,
      model_def_eval=model_def_eval,
      opt_def=opt_def,
      model_state=jax.device_put(model_state, rep),
      opt_state=jax.device_put(opt_state, rep),
      rng=jax.device_put(base, rep),
      step=0,
  )
  return state, lr_fn


# ------------------------------------------------------------------------------ steps
def make_train_step(
    state: TrainState,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    lr_fn: optax.Schedule,
    loss_fn: LossFn | None = None,
    donate: bool = True,
) -> Callable:
  """Jitted `(model_state, opt_state, batch, rng, step) -> (model_state, opt_state, metrics)`.

  `batch` holds global arrays sharded on "data"; `metrics` are replicated scalars: `loss`, the
  loss terms, `grad_norm`, `lr`.
  """
  loss_fn = loss_fn or default_loss_fn
  model_def, opt_def = state.model_def_train, state.opt_def

  def step_fn(model_state, opt_state, batch, rng, step):
    model = nnx.merge(model_def, model_state)
    optimizer = nnx.merge(opt_def, opt_state)
    key = jax.random.fold_in(rng, step)

    def loss_of(m):
      outputs = m(batch["frames"])
      loss, terms = loss_fn(outputs, batch, config, rng=key)
      return loss, terms

    (loss, terms), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = {"loss": loss, **terms}
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = lr_fn(step)
    return nnx.state(model), nnx.state(optimizer), metrics

  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(
      step_fn,
      in_shardings=(rep, rep, dat, rep, rep),
      out_shardings=(rep, rep, rep),
      donate_argnums=(0, 1) if donate else (),
  )


def train_step(state: TrainState, step_fn: Callable, batch: Mapping[str, jax.Array]) -> dict:
  """Runs one jitted step on `state` in place; returns the (device) metrics."""
  state.model_state, state.opt_state, metrics = step_fn(
      state.model_state, state.opt_state, dict(batch), state.rng,
      jnp.asarray(state.step, jnp.int32),
  )
  state.step += 1
  return metrics
