"""The tf.data input pipeline: host-local NumPy batches for training and evaluation.

Train: for each step, `sampling.train_batch` picks the P x K tracklets and their RRS frames
(a pure function of `(config.seed, step)`); this host takes its rows of the global batch; only
those frames are read and decoded (uint8) in a parallel `map`, and each batch is then flipped,
normalised and erased in one fused XLA function (seeds from `(seed, step, row in the global
batch)`, so the batches do not depend on the number of hosts).

Eval: `sampling.eval_plan` lists every clip, padded to whole global batches and split over
hosts; padding rows are zeros with `mask=False` and `tracklet_index=-1`.

`config.data.shuffle_buffer` is not used: the order is fully given by the sampling plan.

Frames come from the reader's file paths (`config.data.source == "files"`) or from a prepared
TFDS ArrayRecord builder (`"tfds"`, see `data_pipelines/tfds_builders`).

A frame file that fails to read while iterating (the frame check before the run was off, or the
file changed since) raises a `DatasetError` naming the file and its tracklet, chained from
TensorFlow's error: the iterators work out the failed batch's tracklets and frames from the plan
and decode them again with `frame_check` (TensorFlow's own message names neither).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from data_pipelines import frame_check
from data_pipelines import sampling as sampling_lib  # `sampling` is an argument name below
from data_pipelines import transforms
from data_pipelines.readers.common import DatasetError
from data_pipelines.tracklets import Tracklet

# Normalisation, flip and erasing of a whole batch run as one XLA-compiled function.
_JIT = True


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (lazy: the data layer stays light)

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def _parallel(config) -> int:
  n = int(config.data.num_parallel_calls)
  return tf.data.AUTOTUNE if n < 0 else max(1, n)


def steps_per_epoch(num_train_ids: int, config) -> int:
  """`config.optim.steps_per_epoch` if > 0, else floor(C / P) (each identity once per epoch)."""
  configured = int(config.optim.get("steps_per_epoch", -1))
  if configured > 0:
    return configured
  return sampling_lib.num_groups(num_train_ids, int(config.data.num_ids_per_batch))


# ------------------------------------------------------------------ frame sources


class FrameSource:
  """Maps (tracklet index, frame indices (L,)) to (L, H, W, 3) float32 frames in [0, 1]."""

  def load(self, tracklet: tf.Tensor, frames: tf.Tensor, height: int, width: int) -> tf.Tensor:
    raise NotImplementedError


class FileSource(FrameSource):
  """Frames read from the tracklets' file paths (one flat path table + per-tracklet offsets)."""

  def __init__(self, tracklets: Sequence[Tracklet]):
    counts = np.asarray([t.num_frames for t in tracklets], np.int64)
    self._offsets = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts)
                                else np.zeros((0,), np.int64), tf.int64)
    self._paths = tf.constant([p for t in tracklets for p in t.frames], tf.string)

  def load(self, tracklet, frames, height, width):
    ids = tf.gather(self._offsets, tracklet) + tf.cast(frames, tf.int64)
    return transforms.read_clip(tf.gather(self._paths, ids), height, width)


def frame_source(tracklets: Sequence[Tracklet], config) -> FrameSource:
  source = config.data.get("source", "files")
  if source == "files":
    return FileSource(tracklets)
  if source == "tfds":
    from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top

    return tfds_builders.TfdsSource(tracklets, config)
  raise ValueError(f"config.data.source must be 'files' or 'tfds', got {source!r}")


def _named_errors(batches: Iterator[dict[str, np.ndarray]],
                  diagnose: Callable[[int], DatasetError | None] | None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """`batches`, where a TF error at batch i becomes `diagnose(i)` (chained) if not None."""
  i = 0
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      error = diagnose(i) if diagnose is not None else None
      if error is None:
        raise
      raise error from e
    yield batch
    i += 1


def _options(num_threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = int(num_threads)
  return options


# ------------------------------------------------------------------ training


def _check_train(tracklets: Sequence[Tracklet]) -> None:
  if not tracklets:
    raise ValueError("train_iterator: no training tracklets")
  pids = np.asarray([t.pid for t in tracklets])
  if pids.min() < 0:
    raise ValueError(
        f"train_iterator: training pids must be relabelled to 0..C-1, got pid {pids.min()}"
    )


def local_train_batch(config, process_count: int) -> int:
  """This host's share of the P x K batch (error if it does not divide evenly)."""
  global_batch = int(config.data.num_ids_per_batch) * int(config.data.num_tracklets_per_id)
  if global_batch % process_count:
    raise ValueError(
        f"the train batch P*K = {global_batch} (config.data.num_ids_per_batch x "
        f"num_tracklets_per_id) is not divisible by the process count {process_count}"
    )
  return global_batch // process_count


def _train_planner(
    tracklets: Sequence[Tracklet], config, process_index: int, process_count: int
) -> Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """step -> this host's rows of its global batch: tracklets (B,), frames (B, L), rows (B,)."""
  _check_train(tracklets)
  local = local_train_batch(config, process_count)
  d = config.data
  index = sampling_lib.IdentityIndex.build([t.pid for t in tracklets],
                                           [t.camid for t in tracklets])
  num_frames = np.asarray([t.num_frames for t in tracklets], np.int64)
  spe = steps_per_epoch(index.num_ids, config)
  seed = int(config.seed)
  rows = np.arange(process_index * local, (process_index + 1) * local)

  def plan(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = sampling_lib.train_batch(
        index, num_frames, int(step), seed=seed, seq_len=int(d.seq_len),
        num_ids_per_batch=int(d.num_ids_per_batch),
        num_tracklets_per_id=int(d.num_tracklets_per_id), steps_per_epoch=spe,
        prefer_cross_camera=bool(d.prefer_cross_camera),
    )
    return p.tracklets[rows], p.frames[rows], rows

  return plan


def train_dataset(
    tracklets: Sequence[Tracklet],
    config,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
) -> tf.data.Dataset:
  """An endless tf.data.Dataset of this host's train batches from `start_step` on.

  Elements: `frames` (B, L, H, W, 3) float32, `pid` (B,) int32, `camid` (B,) int32 with
  B = P*K / process_count. `num_threads` sets tf.data's private thread pool (None: shared).
  """
  transforms.hide_gpus()
  process_index, process_count = _process(process_index, process_count)
  planner = _train_planner(tracklets, config, process_index, process_count)
  local = local_train_batch(config, process_count)
  d = config.data
  L, H, W = int(d.seq_len), int(d.height), int(d.width)
  pids = np.asarray([t.pid for t in tracklets], np.int32)
  camids = np.asarray([t.camid for t in tracklets], np.int32)
  seed = int(config.seed)

  def plan(step: np.int64):
    t, f, rows = planner(int(step))
    return (t.astype(np.int64), f.astype(np.int64), pids[t], camids[t], rows.astype(np.int64))

  def plan_tf(step):
    t, f, pid, cam, row = tf.numpy_function(
        plan, [step], [tf.int64, tf.int64, tf.int32, tf.int32, tf.int64], stateful=False
    )
    t.set_shape([local])
    f.set_shape([local, L])
    pid.set_shape([local])
    cam.set_shape([local])
    row.set_shape([local])
    steps = tf.fill([local], step)
    return tf.data.Dataset.from_tensor_slices((t, f, pid, cam, steps, row))

  source = frame_source(tracklets, config)

  def load(t, f, pid, cam, step, row):
    frames = source.load(t, f, H, W)  # (L, H, W, 3) uint8
    flip, boxes = transforms.augment_params(transforms.clip_seed(seed, step, row), L, H, W, d)
    return frames, flip, boxes, pid, cam

  def finish(frames, flip, boxes, pid, cam):
    valid = tf.ones_like(flip)
    out = transforms.finish_batch(frames, flip, boxes, valid, d.mean, d.std, jit=_JIT)
    return {"frames": out, "pid": pid, "camid": cam}

  ds = tf.data.Dataset.range(int(start_step), np.iinfo(np.int64).max)
  ds = ds.flat_map(plan_tf)
  ds = ds.map(load, num_parallel_calls=_parallel(config), deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.map(finish, num_parallel_calls=_parallel(config), deterministic=True)
  ds = ds.prefetch(int(d.prefetch))
  return ds.with_options(_options(num_threads))


def train_iterator(
    tracklets: Sequence[Tracklet],
    config,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless host-local train batches `{"frames", "pid", "camid"}` from `start_step` on.

  Deterministic in `(config.seed, step)`: `start_step=s` yields the batches an uninterrupted
  run yields from step s on. A frame file that fails to read raises a `DatasetError` naming it
  and its tracklet (from files; TFDS records keep TensorFlow's error).
  """
  process_index, process_count = _process(process_index, process_count)
  ds = train_dataset(
      tracklets, config, start_step=start_step, process_index=process_index,
      process_count=process_count, num_threads=num_threads,
  )
  files = config.data.get("source", "files") == "files"

  def diagnose(i: int) -> DatasetError | None:
    step = int(start_step) + i
    t, f, _ = _train_planner(tracklets, config, process_index, process_count)(step)
    return frame_check.find_bad_frames(zip(t, f), tracklets, "train",
                                       f"in the train batch of step {step}")

  return _named_errors(ds.as_numpy_iterator(), diagnose if files else None)


# ------------------------------------------------------------------ evaluation


@dataclasses.dataclass
class EvalIterator:
  """Re-iterable host-local eval batches `{"frames", "mask", "tracklet_index"}`.

  `num_batches` is the same on every host; `plan` is the global `sampling.EvalPlan`
  (clip -> tracklet mapping, mask); `local_batch` the per-host batch size. Each `iter()` starts
  a new pass over the same tf.data.Dataset (`dataset`).
  """

  plan: sampling_lib.EvalPlan
  process_index: int
  dataset: tf.data.Dataset
  # The tracklets read from files: a frame that fails to read is then named (None: TFDS).
  tracklets: Sequence[Tracklet] | None = None

  @property
  def num_batches(self) -> int:
    return self.plan.num_batches

  @property
  def local_batch(self) -> int:
    return self.plan.local_batch

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    diagnose = self._diagnose if self.tracklets else None
    return _named_errors(self.dataset.as_numpy_iterator(), diagnose)

  def _diagnose(self, i: int) -> DatasetError | None:
    """The error naming the unreadable frames of batch i (this host's rows of it)."""
    rows = self.plan.host_rows(self.process_index)[i * self.local_batch:
                                                   (i + 1) * self.local_batch]
    rows = rows[self.plan.mask[rows]]
    return frame_check.find_bad_frames(
        zip(self.plan.tracklet[rows], self.plan.frames[rows]), self.tracklets, "eval",
        f"in eval batch {i} of {self.num_batches}")


def eval_iterator(
    tracklets: Sequence[Tracklet],
    config,
    *,
    sampling: str | None = None,  # pylint: disable=redefined-outer-name
    clips: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
) -> EvalIterator:
  """Eval batches of every clip of `tracklets` (B = config.data.eval_batch_size / hosts).

  `sampling` ("rrs" | "all_frames") and `clips` ("interleaved" | "consecutive") default to
  `config.eval.sampling` / `config.eval.clips`; short tracklets in interleaved clips are padded
  as `config.eval.short_padding` ("last" when absent; `sampling.all_frames_clips`). Shapes are fixed (padding rows are zeros with
  `mask=False`, `tracklet_index=-1`), so a jitted eval step compiles once.
  """
  transforms.hide_gpus()
  mode = sampling or config.eval.sampling
  clips = clips or config.eval.clips
  process_index, process_count = _process(process_index, process_count)
  d = config.data
  L, H, W = int(d.seq_len), int(d.height), int(d.width)
  plan = sampling_lib.eval_plan(
      [t.num_frames for t in tracklets], seq_len=L, sampling=mode, clips=clips,
      pad=config.eval.get("short_padding", "last"),
      global_batch=int(d.eval_batch_size), process_count=process_count,
  )
  rows = plan.host_rows(process_index)
  local = plan.local_batch
  t_rows = plan.tracklet[rows].astype(np.int32)
  f_rows = plan.frames[rows].astype(np.int64)
  m_rows = plan.mask[rows]

  source = frame_source(tracklets, config) if tracklets else None

  def make() -> tf.data.Dataset:

    def load(t, f, m):
      if source is None:
        frames = tf.zeros([L, H, W, 3], tf.uint8)
      else:
        frames = tf.cond(
            m,
            lambda: source.load(tf.maximum(t, 0), f, H, W),
            lambda: tf.zeros([L, H, W, 3], tf.uint8),
        )
      return frames, m, t

    def finish(frames, m, t):
      flip = tf.zeros_like(m)
      boxes = tf.zeros([local, L, 4], tf.int32)
      out = transforms.finish_batch(frames, flip, boxes, m, d.mean, d.std, jit=_JIT)
      return {"frames": out, "mask": m, "tracklet_index": t}

    ds = tf.data.Dataset.from_tensor_slices((t_rows, f_rows, m_rows))
    ds = ds.map(load, num_parallel_calls=_parallel(config), deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
    ds = ds.map(finish, num_parallel_calls=_parallel(config), deterministic=True)
    ds = ds.prefetch(int(d.prefetch))
    return ds.with_options(_options(num_threads))

  files = tuple(tracklets) if config.data.get("source", "files") == "files" else None
  return EvalIterator(plan=plan, process_index=process_index, dataset=make(), tracklets=files)
