"""Mesh, shardings, host-local -> global batches, prefetch, divisibility and multi-host checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from stmn_jax import sharding
from tests import engine_stubs as stubs


def test_mesh_is_one_auto_data_axis_over_all_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.size == jax.device_count() == 4
  assert mesh.axis_types == (AxisType.Auto,)
  assert sharding.make_mesh(2).size == 2
  with pytest.raises(ValueError, match="num_devices=5: expected 1..4"):
    sharding.make_mesh(5)


def test_global_batch_puts_consecutive_rows_on_each_device():
  mesh = sharding.make_mesh()
  local = stubs.random_batch(0, batch=8)
  g = sharding.global_batch(local, mesh)
  assert g["frames"].shape == local["frames"].shape
  np.testing.assert_array_equal(np.asarray(g["frames"]), local["frames"])
  np.testing.assert_array_equal(np.asarray(g["pid"]), local["pid"])
  for shard in g["pid"].addressable_shards:
    rows = shard.index[0]
    assert shard.data.shape == (2,)
    np.testing.assert_array_equal(np.asarray(shard.data), local["pid"][rows])
  # A reduction over the sharded batch sees the whole global batch.
  total = jax.jit(lambda x: jnp.sum(x))(g["pid"])
  assert int(total) == int(local["pid"].sum())


def test_global_batch_errors_name_the_field():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="'pid' has 6 rows on this host: expected a multiple of "
                     "its 4 local devices"):
    sharding.global_batch({"pid": np.zeros(6, np.int32)}, mesh)
  with pytest.raises(ValueError, match="'step' is a scalar"):
    sharding.global_batch({"step": np.int32(3)}, mesh)


def test_replicate_and_prefetch_keep_values_and_order():
  mesh = sharding.make_mesh()
  tree = {"w": np.arange(6.0).reshape(2, 3)}
  rep = sharding.replicate(tree, mesh)
  assert rep["w"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(rep["w"]), tree["w"])
  batches = [{"x": np.full((4, 2), i, np.float32)} for i in range(5)]
  out = list(sharding.prefetch_to_mesh(iter(batches), mesh, size=2))
  assert len(out) == 5
  for i, b in enumerate(out):
    assert b["x"].sharding.spec == sharding.data_sharded(mesh).spec
    np.testing.assert_array_equal(np.asarray(b["x"]), batches[i]["x"])


def test_divisibility_checks():
  mesh = sharding.make_mesh()
  sharding.check_divisible(8, mesh, "x")
  with pytest.raises(ValueError, match=r"x = 6 must be a positive multiple of the number of "
                     r"devices \(4\)"):
    sharding.check_divisible(6, mesh, "x")
  with pytest.raises(ValueError, match="x = 0"):
    sharding.check_divisible(0, mesh, "x")
  config = stubs.tiny_config()
  config.data.num_ids_per_batch, config.data.num_tracklets_per_id = 4, 2
  config.data.eval_batch_size = 8
  sharding.check_batch_config(config, mesh)  # 8 and 8 fit 4 devices


def test_distributed_is_a_no_op_for_one_process(monkeypatch):
  for var in ("STMN_COORDINATOR_ADDRESS", "STMN_NUM_PROCESSES", "STMN_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  assert sharding.maybe_initialize_distributed(num_processes=1) is False
  with pytest.raises(ValueError, match="needs all of coordinator address"):
    sharding.maybe_initialize_distributed(coordinator_address="127.0.0.1:1234")
  monkeypatch.setenv("STMN_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="num_processes=2, process_id=-1"):
    sharding.maybe_initialize_distributed()
