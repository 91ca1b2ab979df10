"""Train step on 4 fake devices vs 1, vs a direct eager computation; the optimizer schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stmn_jax import sharding
from stmn_jax import train
from stmn_jax import run_setup
from stmn_jax import train_state
from tests import engine_stubs as stubs

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _params(state):
  return jax.device_get(nnx.to_pure_dict(state.model_state))


def _run_steps(config, mesh, batches):
  state, lr_fn = train_state.create_train_state(config, 4, 3, mesh, stubs.tiny_model_fn)
  step_fn = train_state.make_train_step(state, config, mesh, lr_fn, stubs.tiny_loss_fn)
  metrics = []
  for b in batches:
    m = train_state.train_step(state, step_fn, sharding.global_batch(b, mesh))
    metrics.append(jax.device_get(m))
  return state, metrics


def test_four_devices_match_one_device():
  config = stubs.tiny_config()
  batches = [stubs.random_batch(i) for i in range(2)]
  s4, m4 = _run_steps(config, sharding.make_mesh(), batches)
  s1, m1 = _run_steps(config, sharding.make_mesh(1), batches)
  assert s4.step == s1.step == 2
  assert sharding.make_mesh().size == 4
  for a, b in zip(m4, m1):
    for k in ("loss", "ce", "triplet", "grad_norm", "lr"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  p4, p1 = _params(s4), _params(s1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p4, p1)
  # Batch statistics are global: the BN running mean equals the one-device value, and it moved.
  assert not np.allclose(p4["bn"]["mean"], 0.0)


def test_train_step_matches_direct_computation():
  """One jitted step == eager forward/backward + optax update on the same model."""
  config = stubs.tiny_config()
  mesh = sharding.make_mesh()
  batch = stubs.random_batch(7)
  state, lr_fn = train_state.create_train_state(config, 4, 3, mesh, stubs.tiny_model_fn)
  # A direct copy of the initial model and optimizer.
  model = nnx.merge(
      state.model_def_train,
      jax.tree.map(lambda x: jnp.array(np.asarray(x)), state.model_state),
  )
  tx, _ = train_state.create_optimizer(config, 3)
  params = nnx.state(model, nnx.Param)
  opt_state = tx.init(params)

  graphdef = nnx.graphdef(model)

  @jax.jit
  def direct(model_state, opt_state):
    m = nnx.merge(graphdef, model_state)

    def loss_of(m):
      return stubs.tiny_loss_fn(m(jnp.asarray(batch["frames"])), batch, config)[0]

    loss, grads = nnx.value_and_grad(loss_of)(m)
    p = nnx.state(m, nnx.Param)
    updates, _ = tx.update(grads, opt_state, p)
    return loss, optax.apply_updates(p, updates)

  loss, expected = direct(nnx.state(model), opt_state)

  step_fn = train_state.make_train_step(state, config, mesh, lr_fn, stubs.tiny_loss_fn)
  m = train_state.train_step(state, step_fn, sharding.global_batch(batch, mesh))
  np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5)
  got = nnx.to_pure_dict(nnx.state(state.model(), nnx.Param))
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      jax.device_get(got), jax.device_get(nnx.to_pure_dict(expected)),
  )
  # And it is an actual change of the parameters.
  init = nnx.to_pure_dict(params)
  assert not np.allclose(got["proj"]["kernel"], init["proj"]["kernel"])


def test_schedule_step_decay():
  config = stubs.tiny_config()
  config.optim.learning_rate, config.optim.decay_every_epochs = 1e-3, 2
  config.optim.decay_factor = 0.1
  spe = 5
  lr = train_state.create_learning_rate_fn(config, spe)
  boundary = 2 * spe
  expected = {0: 1e-3, boundary - 1: 1e-3, boundary: 1e-4, 2 * boundary - 1: 1e-4,
              2 * boundary: 1e-5}
  for step, value in expected.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6)


def test_optimizer_is_adam_with_coupled_l2():
  """One update equals torch.optim.Adam's formula with weight decay added to the gradient."""
  config = stubs.tiny_config()
  o = config.optim
  o.learning_rate, o.weight_decay, o.b1, o.b2 = 1e-2, 0.1, 0.9, 0.999
  tx, _ = train_state.create_optimizer(config, 10)
  p = jnp.array([1.0, -2.0, 3.0])
  g = jnp.array([0.5, 0.1, -0.2])
  updates, _ = tx.update(g, tx.init(p), p)
  g2 = np.asarray(g) + 0.1 * np.asarray(p)
  m, v = (1 - 0.9) * g2, (1 - 0.999) * g2**2
  mhat, vhat = m / (1 - 0.9), v / (1 - 0.999)
  expected = -1e-2 * mhat / (np.sqrt(vhat) + 1e-8)
  np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-5)


def test_bad_batch_sizes_fail_before_work():
  mesh = sharding.make_mesh()
  config = stubs.tiny_config()
  config.data.num_ids_per_batch, config.data.num_tracklets_per_id = 3, 2
  with pytest.raises(ValueError, match=r"num_ids_per_batch \* .*num_tracklets_per_id \(3 x 2\)"):
    sharding.check_batch_config(config, mesh)
  config.data.num_ids_per_batch, config.data.eval_batch_size = 4, 6
  with pytest.raises(ValueError, match=r"eval_batch_size = 6 must be a positive multiple of .*\(4\)"):
    sharding.check_batch_config(config, mesh)


def test_bad_training_fields_are_named():
  config = stubs.tiny_config()
  config.train.select_on = "gallery"
  with pytest.raises(ValueError, match="config.train.select_on = 'gallery'"):
    run_setup.check_config(config)
