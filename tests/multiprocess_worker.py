"""One process of the multi-process training test (tests/test_multiprocess.py).

Run as `python -m tests.multiprocess_worker --root R --workdir W --out OUT.npz
--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I`. The caller sets
`XLA_FLAGS=--xla_force_host_platform_device_count=2` (and `JAX_PLATFORMS=cpu`) in this
process's environment, before jax is imported. The worker joins the run through
`sharding.maybe_initialize_distributed` (gloo CPU collectives), trains `--steps` steps of the
engine's stand-in model with `train.train_and_evaluate` (the real loop: this process's share
of each batch from `train_iterator(process_index, process_count)`, global batches by
`jax.make_array_from_process_local_data`) and writes its final parameters to `--out`.

Without `--coordinator_address` it is a plain single-process run on all local devices (the
reference of the test uses the same functions in-process).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from data_pipelines.tracklets import Split, Tracklet

NUM_FRAMES = 5
FRAME_SHAPE = (16, 8, 3)


def _frame(pid: int, cam: int, f: int) -> np.ndarray:
  """(16, 8, 3) uint8: an identity/camera colour plus deterministic noise."""
  rs = np.random.RandomState(1000 * pid + 10 * cam + f)
  base = np.full(FRAME_SHAPE, (20 * pid + 60 * cam) % 200, np.int32)
  return np.clip(base + rs.randint(0, 40, size=FRAME_SHAPE), 0, 255).astype(np.uint8)


def tiny_split(root: str, write: bool) -> Split:
  """8 identities x 2 cameras x 5 frames of 16x8 PNGs in `root` (written when `write`)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def tracklet(pid, cam, tag):
    paths = []
    for f in range(NUM_FRAMES):
      path = os.path.join(root, f"{tag}_{pid}_{cam}_{f}.png")
      if write:
        Image.fromarray(_frame(pid, cam, f)).save(path)
      paths.append(path)
    return Tracklet(tuple(paths), pid, cam)

  train_t = tuple(tracklet(p, c, "tr") for p in range(8) for c in range(2))
  query = tuple(tracklet(p, 0, "te") for p in (10, 11))
  gallery = tuple(tracklet(p, 1, "te") for p in (10, 11))
  return Split("tiny_mp", train_t, query, gallery)


def run_config():
  """The engine's stand-in config (smoke config, 16x8, L=2) with a global batch of 8."""
  from tests import engine_stubs as stubs  # pylint: disable=g-import-not-at-top

  config = stubs.tiny_config()
  config.optim.num_epochs, config.optim.steps_per_epoch = 1, 10
  config.train.checkpoint_every_steps = 2  # the run also saves (orbax, all processes) once
  config.train.log_every_steps = 1
  config.dataset.num_val_ids = 0
  config.train.select_on = "none"
  config.data.erasing_prob = 0.5  # augmentation seeds must follow the global row, not the host
  config.data.num_parallel_calls = 1
  return config


def train_params(root: str, workdir: str, steps: int) -> tuple[dict[str, Any], list, dict]:
  """Runs the engine loop for `steps` steps.

  Returns (params as a NumPy pure dict, loss history [(step, loss)], this host's batch rows:
  {"pid": (steps, B_local), "frame_sum": (steps, B_local) sum of each row's frames}).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from stmn_jax import train  # pylint: disable=g-import-not-at-top
  from tests import engine_stubs as stubs  # pylint: disable=g-import-not-at-top

  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top

  split = tiny_split(root, write=False)
  seen: list[tuple[np.ndarray, np.ndarray]] = []
  original = pipeline.train_iterator

  def recording_iterator(*args, **kwargs):  # records this host's rows of every batch
    for batch in original(*args, **kwargs):
      frames = np.asarray(batch["frames"])
      seen.append((np.asarray(batch["pid"]), frames.reshape(frames.shape[0], -1).sum(axis=1)))
      yield batch

  pipeline.train_iterator = recording_iterator
  try:
    state, summary = train.train_and_evaluate(
        run_config(), workdir, model_fn=stubs.tiny_model_fn, loss_fn=stubs.tiny_loss_fn,
        split=split, max_steps=steps)
  finally:
    pipeline.train_iterator = original
  # The loop prefetches: keep the batches of the steps that ran.
  seen = seen[:steps]
  # Replicated global arrays: every process holds a full copy in its first local shard.
  pure = nnx.to_pure_dict(state.model_state)
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), pure)
  rows = {"pid": np.stack([p for p, _ in seen]), "frame_sum": np.stack([f for _, f in seen])}
  return params, summary["loss_history"], rows


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = np.asarray(v)
  return out


def flat_params(tree: Any) -> dict[str, np.ndarray]:
  """Nested pure dict -> {"a/b/c": array}."""
  return _flatten(tree)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--root", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--coordinator_address", default="")
  p.add_argument("--num_processes", type=int, default=0)
  p.add_argument("--process_id", type=int, default=-1)
  args = p.parse_args()

  import jax  # pylint: disable=g-import-not-at-top

  from stmn_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.maybe_initialize_distributed(
      args.coordinator_address, args.num_processes, args.process_id)
  params, losses, rows = train_params(args.root, args.workdir, args.steps)
  flat = flat_params(params)
  flat["__pid__"], flat["__frame_sum__"] = rows["pid"], rows["frame_sum"]
  flat["__losses__"] = np.asarray([l for _, l in losses], np.float64)
  flat["__process__"] = np.asarray(
      [jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()])
  np.savez(args.out, **flat)
  if args.coordinator_address:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
