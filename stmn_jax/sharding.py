"""Device mesh, shardings and host-local -> global batches (data parallel over every device).

One mesh axis, `"data"`: the batch is split over it, parameters and optimizer state are
replicated. The mesh uses `AxisType.Auto` (not jax 0.10's default `Explicit`): with Explicit
axes every op that mixes two batch-sharded operands (the pairwise distances of batch-hard
triplet mining, `e[:, None] - e[None]`) raises a `ShardingTypeError` unless the model and loss
code carry sharding annotations; with Auto axes plain `jax.jit` / `nnx.jit` code with
`NamedSharding` inputs runs unchanged and XLA inserts the collectives (statistics over the
global batch, no `axis_name`).
"""

from __future__ import annotations

import collections
import itertools
import os
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from stmn_jax import errors

DATA_AXIS = "data"


def maybe_initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
  """Calls `jax.distributed.initialize` for a multi-process run; a no-op for one process.

  Arguments (from flags) win over the environment variables `STMN_COORDINATOR_ADDRESS`,
  `STMN_NUM_PROCESSES`, `STMN_PROCESS_ID`. Returns True when it initialised.
  """
  address = coordinator_address or os.environ.get("STMN_COORDINATOR_ADDRESS", "")
  count = num_processes or int(os.environ.get("STMN_NUM_PROCESSES", "0") or 0)
  pid = process_id if process_id >= 0 else int(os.environ.get("STMN_PROCESS_ID", "-1") or -1)
  if not address and count <= 1:
    return False
  if not address or count < 1 or pid < 0:
    raise errors.ConfigError(
        "multi-process run needs all of coordinator address, number of processes and process "
        f"id (got address={address!r}, num_processes={count}, process_id={pid})"
    )
  # Must not touch the backend before `initialize` (no `jax.default_backend()` here). Cross-
  # process collectives between CPU devices need gloo; on TPU / GPU hosts the setting only
  # concerns the (unused) CPU client, so it is set whenever CPU is a possible platform.
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if not platforms or "cpu" in platforms.split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
  return True


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh `("data",)` over all devices (or the first `num_devices`), Auto axis type."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices}: expected 1..{len(devices)}")
    devices = devices[:num_devices]
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters / optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of batches: the leading (batch) axis split over `"data"`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(global_batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises a ConfigError unless `global_batch_size` splits evenly over devices and hosts."""
  n = mesh.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise errors.ConfigError(
        f"{what} = {global_batch_size} must be a positive multiple of the number of devices "
        f"({n}); change the config (or run on a multiple-fitting number of devices)"
    )
  if global_batch_size % jax.process_count():
    raise errors.ConfigError(
        f"{what} = {global_batch_size} must be divisible by the number of processes "
        f"({jax.process_count()})"
    )


def check_batch_config(config, mesh: Mesh) -> None:
  """Checks the train (P*K) and eval global batch sizes against the mesh before any work."""
  d = config.data
  check_divisible(
      d.num_ids_per_batch * d.num_tracklets_per_id,
      mesh,
      "train batch config.data.num_ids_per_batch * config.data.num_tracklets_per_id "
      f"({d.num_ids_per_batch} x {d.num_tracklets_per_id})",
  )
  check_divisible(d.eval_batch_size, mesh, "config.data.eval_batch_size")


def local_batch_size(global_batch_size: int) -> int:
  """This host's share of a global batch."""
  return global_batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local NumPy batch dict -> global `jax.Array`s sharded on `"data"` (leading axis)."""
  sharding = data_sharded(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"batch field {key!r} is a scalar: expected a leading batch axis")
    n_local = len(mesh.local_devices)
    if value.shape[0] % n_local:
      raise ValueError(
          f"batch field {key!r} has {value.shape[0]} rows on this host: expected a multiple "
          f"of its {n_local} local devices"
      )
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of `tree` on all devices of the mesh (no pmap-era helpers)."""
  return jax.device_put(tree, replicated(mesh))


def prefetch_to_mesh(
    batches: Iterable[Mapping[str, Any]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Turns host-local batches into global arrays, keeping `size` batches in flight."""
  queue = collections.deque()
  it = iter(batches)

  def enqueue(n):
    for batch in itertools.islice(it, n):
      queue.append(global_batch(batch, mesh))

  enqueue(max(size, 1))
  while queue:
    yield queue.popleft()
    enqueue(1)
