"""Index logic of the input pipeline: which tracklets and which frames (pure NumPy, no TF).

Everything random here is a pure function of `(seed, step)` (NumPy generators seeded with a list
of integers), so a run resumed at step `s` sees exactly the batches an uninterrupted run sees.

- Restricted random sampling (RRS, DRSA / STMN): a tracklet of `n` frames is padded with its last
  frame up to `ceil(n / L) * L` and cut into `L` equal chunks; training takes one random frame per
  chunk, testing the first frame of each chunk.
- All-frames clips for the test: `interleaved` (STMN's `test_all`) or `consecutive`.
- P x K identity-balanced batches: each epoch visits every training identity once.
- Eval plans: every clip of a list of tracklets, padded to whole global batches with a mask and
  split evenly over the hosts.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Stream tags that keep the generators of different purposes apart for the same (seed, step).
_EPOCH_STREAM = 0
_DRAW_STREAM = 1
_FRAME_STREAM = 2

CLIP_MODES = ("interleaved", "consecutive")
EVAL_SAMPLINGS = ("rrs", "all_frames")
SHORT_PADDINGS = ("last", "official")  # config.eval.short_padding (`all_frames_clips`)


def _check_positive(name: str, value: int) -> None:
  if int(value) < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")


def rrs_chunks(num_frames: int, seq_len: int) -> np.ndarray:
  """Frame indices cut into `seq_len` equal chunks: -> (L, ceil(n / L)) int64.

  The index list 0..n-1 is padded with its last index up to a multiple of L; a tracklet shorter
  than L thus gives chunks of one frame each, the last ones repeating its last frame.
  """
  _check_positive("num_frames", num_frames)
  _check_positive("seq_len", seq_len)
  chunk = -(-num_frames // seq_len)
  idx = np.minimum(np.arange(chunk * seq_len), num_frames - 1)
  return idx.reshape(seq_len, chunk)


def rrs_train_indices(num_frames: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
  """One uniformly random frame per RRS chunk: -> (L,) int64, non-decreasing."""
  chunks = rrs_chunks(num_frames, seq_len)
  pick = rng.integers(0, chunks.shape[1], size=seq_len)
  return chunks[np.arange(seq_len), pick]


def rrs_test_indices(num_frames: int, seq_len: int) -> np.ndarray:
  """The first frame of each RRS chunk: -> (L,) int64."""
  return rrs_chunks(num_frames, seq_len)[:, 0]


def all_frames_clips(
    num_frames: int, seq_len: int, mode: str = "interleaved", pad: str = "last"
) -> np.ndarray:
  """Every clip of a tracklet for the all-frames test: -> (num_clips, L) int64.

  `interleaved` (STMN `test_all`): a tracklet shorter than L is first padded to L frames;
  with `div = n // L`, clip i takes frames {j * div + i : j = 0..L-1} for i = 0..div-1, which
  covers the first `L * div` frames. `consecutive`: non-overlapping runs of L frames, the last
  one padded with the tracklet's last frame.

  `pad` (`config.eval.short_padding`) sets how the interleaved mode pads short tracklets:
  "last" repeats the last frame (default: the paper does not say, and it is the plain choice);
  "official" appends the current second-to-last frame until L frames, as the official STMN
  code's `imgs[-2:-1]` loop (n=3, L=6: 0 1 2 1 2 1), repeating the only frame when n == 1
  (where the official loop never ends). The consecutive mode ignores it.
  """
  _check_positive("num_frames", num_frames)
  _check_positive("seq_len", seq_len)
  if mode == "interleaved":
    if pad not in SHORT_PADDINGS:
      raise ValueError(f"pad must be one of {SHORT_PADDINGS}, got {pad!r}")
    frames = list(range(num_frames))
    while len(frames) < seq_len:
      # official: frames += frames[-2:-1] (the current second-to-last, so it alternates)
      frames.append(frames[-2] if pad == "official" and len(frames) > 1 else frames[-1])
    frames = np.asarray(frames)
    div = len(frames) // seq_len
    # clip i, position j -> frames[j * div + i]
    grid = np.arange(seq_len)[None, :] * div + np.arange(div)[:, None]
    return frames[grid]
  if mode == "consecutive":
    num_clips = -(-num_frames // seq_len)
    idx = np.minimum(np.arange(num_clips * seq_len), num_frames - 1)
    return idx.reshape(num_clips, seq_len)
  raise ValueError(f"unknown clip mode {mode!r}: expected one of {CLIP_MODES}")


# ------------------------------------------------------------------ P x K identity batches


def num_groups(num_ids: int, num_ids_per_batch: int) -> int:
  """Batches in one pass over the identities (`floor(C / P)`, drop-last as the official code)."""
  _check_positive("num_ids_per_batch", num_ids_per_batch)
  if num_ids < num_ids_per_batch:
    raise ValueError(
        f"P x K sampling needs at least P={num_ids_per_batch} training identities, "
        f"got {num_ids}"
    )
  return num_ids // num_ids_per_batch


@dataclasses.dataclass(frozen=True)
class IdentityIndex:
  """The training tracklets grouped by identity (and camera), built once.

  `ids` (C,) sorted distinct pids; `members[c]` the tracklet indices of `ids[c]`;
  `by_camera[c]` the same indices as one array per camera (cameras sorted).
  """

  ids: np.ndarray
  members: tuple[np.ndarray, ...]
  by_camera: tuple[tuple[np.ndarray, ...], ...]

  @classmethod
  def build(cls, pids: Sequence[int], camids: Sequence[int]) -> "IdentityIndex":
    pids = np.asarray(pids, np.int64)
    camids = np.asarray(camids, np.int64)
    if pids.shape != camids.shape or pids.ndim != 1:
      raise ValueError(f"pids {pids.shape} and camids {camids.shape} must be equal 1-D shapes")
    if pids.size == 0:
      raise ValueError("no training tracklets")
    ids = np.unique(pids)
    members, by_camera = [], []
    for pid in ids:
      m = np.flatnonzero(pids == pid)
      members.append(m)
      by_camera.append(tuple(m[camids[m] == c] for c in np.unique(camids[m])))
    return cls(ids, tuple(members), tuple(by_camera))

  @property
  def num_ids(self) -> int:
    return len(self.ids)


def epoch_identity_groups(
    index: IdentityIndex, *, seed: int, epoch: int, num_ids_per_batch: int, steps_per_epoch: int
) -> np.ndarray:
  """Identity positions (into `index.ids`) of every batch of one epoch: -> (S, P) int64.

  A permutation of the C identities, drawn from `(seed, epoch)`, is cut into floor(C / P)
  groups of P. If the epoch has more steps than that (a configured `steps_per_epoch`), further
  permutations `(seed, epoch, round)` follow; if it has fewer, the epoch stops early.
  """
  groups = num_groups(index.num_ids, num_ids_per_batch)
  _check_positive("steps_per_epoch", steps_per_epoch)
  rounds = -(-steps_per_epoch // groups)
  out = []
  for r in range(rounds):
    key = [seed, _EPOCH_STREAM, epoch] + ([r] if r else [])
    perm = np.random.default_rng(key).permutation(index.num_ids)
    out.append(perm[: groups * num_ids_per_batch].reshape(groups, num_ids_per_batch))
  return np.concatenate(out)[:steps_per_epoch]


def _draw_tracklets(
    index: IdentityIndex, c: int, k: int, rng: np.random.Generator, prefer_cross_camera: bool
) -> np.ndarray:
  """K tracklet indices of identity position c, drawn with replacement: -> (K,)."""
  if not prefer_cross_camera:
    return rng.choice(index.members[c], size=k, replace=True)
  cams = index.by_camera[c]
  order = rng.permutation(len(cams))
  # Draw i uses camera order[i % #cams]: the first min(K, #cams) draws are all from
  # different cameras; within a camera the tracklet is drawn uniformly.
  return np.asarray([rng.choice(cams[order[i % len(cams)]]) for i in range(k)])


@dataclasses.dataclass(frozen=True)
class TrainBatchPlan:
  """One global training batch: `tracklets` (P*K,) indices, `frames` (P*K, L) frame indices."""

  tracklets: np.ndarray
  frames: np.ndarray


def pk_batch(
    index: IdentityIndex,
    step: int,
    *,
    seed: int,
    num_ids_per_batch: int,
    num_tracklets_per_id: int,
    steps_per_epoch: int,
    prefer_cross_camera: bool = False,
) -> np.ndarray:
  """Tracklet indices of the global batch of `step`: -> (P*K,) int64, id by id (K rows each).

  A pure function of `(seed, step)`: the epoch's identity order comes from `(seed, epoch)`, the
  K tracklets per identity from `(seed, step)`. They are drawn with replacement (official
  code); `prefer_cross_camera` first takes them from different cameras.
  """
  _check_positive("num_tracklets_per_id", num_tracklets_per_id)
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  epoch, pos = divmod(int(step), int(steps_per_epoch))
  group = epoch_identity_groups(
      index, seed=seed, epoch=epoch, num_ids_per_batch=num_ids_per_batch,
      steps_per_epoch=steps_per_epoch,
  )[pos]
  rng = np.random.default_rng([seed, _DRAW_STREAM, int(step)])
  return np.concatenate(
      [_draw_tracklets(index, c, num_tracklets_per_id, rng, prefer_cross_camera) for c in group]
  ).astype(np.int64)


def train_batch(
    index: IdentityIndex,
    num_frames: np.ndarray,
    step: int,
    *,
    seed: int,
    seq_len: int,
    num_ids_per_batch: int,
    num_tracklets_per_id: int,
    steps_per_epoch: int,
    prefer_cross_camera: bool = False,
) -> TrainBatchPlan:
  """The P x K tracklets of `step` and their RRS training frames, from `(seed, step)`."""
  tracklets = pk_batch(
      index, step, seed=seed, num_ids_per_batch=num_ids_per_batch,
      num_tracklets_per_id=num_tracklets_per_id, steps_per_epoch=steps_per_epoch,
      prefer_cross_camera=prefer_cross_camera,
  )
  rng = np.random.default_rng([seed, _FRAME_STREAM, int(step)])
  frames = np.stack([rrs_train_indices(int(num_frames[t]), seq_len, rng) for t in tracklets])
  return TrainBatchPlan(tracklets, frames)


# ------------------------------------------------------------------ evaluation plans


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """All clips of a list of tracklets, padded and split over hosts.

  Global arrays (`num_batches * global_batch` rows, row r of global batch b at
  `b * global_batch + r`): `frames` (R, L) frame indices within the tracklet, `tracklet` (R,)
  (-1 on padding), `mask` (R,) bool. `num_clips` real clips come first, in tracklet order.
  """

  frames: np.ndarray
  tracklet: np.ndarray
  mask: np.ndarray
  num_clips: int
  global_batch: int
  process_count: int

  @property
  def num_batches(self) -> int:
    return len(self.tracklet) // self.global_batch

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.process_count

  def host_rows(self, process_index: int) -> np.ndarray:
    """Row indices of this host's share, batch after batch: -> (num_batches * local_batch,)."""
    if not 0 <= process_index < self.process_count:
      raise ValueError(f"process_index {process_index} not in [0, {self.process_count})")
    b = self.local_batch
    starts = np.arange(self.num_batches) * self.global_batch + process_index * b
    return (starts[:, None] + np.arange(b)[None, :]).reshape(-1)


def tracklet_clips(
    num_frames: int, seq_len: int, sampling: str, clips: str = "interleaved", pad: str = "last"
) -> np.ndarray:
  """The eval clips of one tracklet: -> (num_clips, L); rrs gives one clip. `pad`: how
  interleaved all-frames clips pad a tracklet shorter than L (`all_frames_clips`)."""
  if sampling == "rrs":
    return rrs_test_indices(num_frames, seq_len)[None]
  if sampling == "all_frames":
    return all_frames_clips(num_frames, seq_len, clips, pad)
  raise ValueError(f"unknown eval sampling {sampling!r}: expected one of {EVAL_SAMPLINGS}")


def eval_plan(
    num_frames: Sequence[int],
    *,
    seq_len: int,
    sampling: str,
    clips: str = "interleaved",
    pad: str = "last",
    global_batch: int,
    process_count: int = 1,
) -> EvalPlan:
  """Every clip of every tracklet, padded to whole global batches (none for no tracklets).

  `pad`: how interleaved all-frames clips pad a tracklet shorter than L (`all_frames_clips`).
  """
  _check_positive("global_batch", global_batch)
  _check_positive("process_count", process_count)
  if pad not in SHORT_PADDINGS:
    raise ValueError(f"short-tracklet padding must be one of {SHORT_PADDINGS}, got {pad!r}")
  if global_batch % process_count:
    raise ValueError(
        f"eval batch {global_batch} is not divisible by the process count {process_count}"
    )
  per = [tracklet_clips(int(n), seq_len, sampling, clips, pad) for n in num_frames]
  if per:
    frames = np.concatenate(per).astype(np.int32)
    tracklet = np.repeat(np.arange(len(per), dtype=np.int32), [len(p) for p in per])
  else:
    frames = np.zeros((0, seq_len), np.int32)
    tracklet = np.zeros((0,), np.int32)
  n = len(tracklet)
  total = -(-n // global_batch) * global_batch
  pad = total - n
  return EvalPlan(
      frames=np.concatenate([frames, np.zeros((pad, seq_len), np.int32)]),
      tracklet=np.concatenate([tracklet, np.full(pad, -1, np.int32)]),
      mask=np.arange(total) < n,
      num_clips=n,
      global_batch=global_batch,
      process_count=process_count,
  )
