"""The dataset-independent tracklet index every reader returns.

A `Tracklet` is one person's track in one camera: its frame paths sorted by frame number, its
person id and its 0-based camera id. A `Split` holds the train / query / gallery tracklets of a
dataset. Train pids are relabelled 0..C-1 by the readers; query and gallery pids keep their raw
values (pid 0 may be a distractor; pid -1 junk is dropped by the readers that have it).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tracklet:
  """One tracklet: `frames` (paths sorted by frame number), `pid`, 0-based `camid`."""

  frames: tuple[str, ...]
  pid: int
  camid: int

  def __post_init__(self):
    if not self.frames:
      raise ValueError(f"empty tracklet (pid={self.pid}, camid={self.camid}): no frames")

  @property
  def num_frames(self) -> int:
    return len(self.frames)


@dataclasses.dataclass(frozen=True)
class Split:
  """A dataset's tracklet index: train / query / gallery lists of `Tracklet`."""

  name: str
  train: tuple[Tracklet, ...]
  query: tuple[Tracklet, ...]
  gallery: tuple[Tracklet, ...]

  @property
  def num_train_pids(self) -> int:
    return len({t.pid for t in self.train})

  def part(self, name: str) -> tuple[Tracklet, ...]:
    if name not in ("train", "query", "gallery"):
      raise ValueError(f"unknown split part {name!r}: expected train, query or gallery")
    return getattr(self, name)

  def summary(self) -> dict:
    """Counts per part plus the number of queries with no valid gallery match."""
    parts = {
        name: split_counts(self.part(name)) for name in ("train", "query", "gallery")
    }
    return {
        "dataset": self.name,
        "splits": parts,
        "queries_without_match": queries_without_match(self.query, self.gallery),
    }


def split_counts(tracklets: Sequence[Tracklet]) -> dict:
  """{"ids", "tracklets", "frames", "cameras"} for a list of tracklets."""
  return {
      "ids": len({t.pid for t in tracklets}),
      "tracklets": len(tracklets),
      "frames": int(sum(t.num_frames for t in tracklets)),
      "cameras": len({t.camid for t in tracklets}),
  }


def queries_without_match(query: Sequence[Tracklet], gallery: Sequence[Tracklet]) -> int:
  """Queries with no gallery tracklet of the same pid seen by another camera.

  The protocol drops same-pid-same-camera gallery items (this also removes the query itself when
  the gallery contains the queries) and pid -1 junk; such queries are skipped by the evaluation.
  """
  by_pid: dict[int, set[int]] = {}
  for t in gallery:
    if t.pid != -1:
      by_pid.setdefault(t.pid, set()).add(t.camid)
  return sum(1 for q in query if not (by_pid.get(q.pid, set()) - {q.camid}))


def relabel(tracklets: Iterable[Tracklet]) -> tuple[Tracklet, ...]:
  """Maps the pids of `tracklets` to 0..C-1 in increasing order of the raw pid."""
  tracklets = tuple(tracklets)
  mapping = {pid: i for i, pid in enumerate(sorted({t.pid for t in tracklets}))}
  return tuple(dataclasses.replace(t, pid=mapping[t.pid]) for t in tracklets)


def arrays(tracklets: Sequence[Tracklet]) -> dict[str, np.ndarray]:
  """pid, camid and num_frames of each tracklet as int32 arrays (for evaluation and sampling)."""
  return {
      "pid": np.asarray([t.pid for t in tracklets], np.int32),
      "camid": np.asarray([t.camid for t in tracklets], np.int32),
      "num_frames": np.asarray([t.num_frames for t in tracklets], np.int32),
  }


def holdout_validation(
    split: Split, num_val_ids: int, num_val_queries: int, seed: int
) -> tuple[Split, Split]:
  """The paper's model selection: hold out `num_val_ids` random training identities.

  Returns `(train_split, val_split)`. `train_split` keeps `split`'s query and gallery and trains
  on the other identities, relabelled 0..C'-1. `val_split` (named "<name>-val", no train part)
  has as gallery every held-out tracklet (queries included, as MARS's official protocol; the
  evaluation drops same-pid-same-camera items) and as query at most `num_val_queries` random
  held-out tracklets, taken first among those with a held-out tracklet of the same pid in another
  camera (a valid match), then among the rest. Val pids are the (relabelled) train pids.
  Deterministic for `seed` (NumPy PCG64).
  """
  pids = sorted({t.pid for t in split.train})
  if not 0 < num_val_ids < len(pids):
    raise ValueError(
        f"num_val_ids={num_val_ids}: expected 1..{len(pids) - 1} (the {split.name} train part "
        f"has {len(pids)} identities)"
    )
  if num_val_queries < 1:
    raise ValueError(f"num_val_queries={num_val_queries}: expected >= 1")
  rng = np.random.default_rng(seed)
  val_ids = {int(p) for p in rng.choice(np.asarray(pids), size=num_val_ids, replace=False)}
  held = [t for t in split.train if t.pid in val_ids]
  cams: dict[int, set[int]] = {}
  for t in held:
    cams.setdefault(t.pid, set()).add(t.camid)
  matched = [i for i, t in enumerate(held) if cams[t.pid] - {t.camid}]
  unmatched = [i for i, t in enumerate(held) if not cams[t.pid] - {t.camid}]
  order = [*rng.permutation(matched).tolist(), *rng.permutation(unmatched).tolist()]
  chosen = sorted(order[:num_val_queries])
  val = Split(
      name=f"{split.name}-val",
      train=(),
      query=tuple(held[i] for i in chosen),
      gallery=tuple(held),
  )
  train = dataclasses.replace(
      split, train=relabel(t for t in split.train if t.pid not in val_ids)
  )
  return train, val
