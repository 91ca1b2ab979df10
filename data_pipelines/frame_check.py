"""Frames checked to decode before a run starts; frames that decoded are remembered.

`check_frames(paths, cache_file=...)` reads every frame with the pipeline's own reader
(`transforms.read_frame`: `tf.io.read_file`, the header check, `tf.io.decode_image`; TensorFlow's
libjpeg is stricter than PIL for some corrupt JPEGs, so PIL alone can pass a frame training
cannot read) in a parallel tf.data `map` (C++ threads, no GIL), and returns the frames that
fail with TensorFlow's message. Frames that decoded are remembered in a cache file of 64-bit
keys of (absolute path, size, mtime_ns, ctime_ns): a later check of an unchanged frame is one
`os.stat` and a lookup, while a frame written since (even with its old mtime restored) has a new
key and is decoded again. Bad frames are never remembered: they fail every check.

`check_tracklets(parts)` checks the frames of named tracklet lists (each frame once) and raises
a `DatasetError` naming each bad file and its tracklet (up to `MAX_LISTED`, then a count);
`find_bad_frames` does the same for the pipeline's run-time diagnosis of a failed batch. One
cache file per dataset root (`cache_path`): `<folder>/<root name>-<hash of the root>.npy`,
written atomically (tmp + rename), read with `allow_pickle=False`; the folder defaults to
`$XDG_CACHE_HOME/stmn_jax/frame_check` (`~/.cache/...`), and "none" remembers nothing.

TensorFlow is imported only when frames are decoded, so a check that finds everything in its
cache (and the TF-free `stmn_jax.run_setup`, which calls it) does not load it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import tempfile
import time
from concurrent import futures
from typing import Iterable, Sequence

import numpy as np

from data_pipelines.readers.common import DatasetError
from data_pipelines.tracklets import Split, Tracklet

MAX_LISTED = 10  # bad frames listed in an error; the rest are counted
NO_CACHE = "none"  # a cache folder value that remembers nothing
_CHUNK = 65536  # frames per tf.data pass (progress is logged after each)
_STAT_CHUNK = 2048

NamedParts = Sequence[tuple[str, Sequence[Tracklet]]]


@dataclasses.dataclass(frozen=True)
class CheckResult:
  """What `check_frames` found: `bad` {path: error} in input order, counts and seconds."""

  bad: dict[str, str]
  num_frames: int
  num_decoded: int
  seconds: float
  cache_file: str | None


@dataclasses.dataclass(frozen=True)
class Owner:
  """A tracklet that holds a frame: its part label, index in that part, and the tracklet."""

  part: str
  index: int
  tracklet: Tracklet

  def describe(self) -> str:
    t = self.tracklet
    return (f"{self.part} tracklet {self.index} (pid {t.pid}, camera {t.camid}, "
            f"{t.num_frames} frames, first frame {t.frames[0]!r})")


# ------------------------------------------------------------------ cache


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/stmn_jax/frame_check`, else `~/.cache/stmn_jax/frame_check`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "stmn_jax", "frame_check")


def cache_path(root: str, cache_dir: str = "") -> str | None:
  """The cache file of a dataset root in `cache_dir` ("" the default folder, "none": None)."""
  if cache_dir == NO_CACHE:
    return None
  root = os.path.abspath(root)
  digest = hashlib.blake2b(root.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(root.rstrip(os.sep))) or "root"
  folder = os.path.expanduser(cache_dir or default_cache_dir())
  return os.path.join(folder, f"{name}-{digest}.npy")


def load_cache(path: str | None) -> np.ndarray:
  """The sorted uint64 keys of `path`; empty when it is missing or unreadable (a warning)."""
  empty = np.zeros((0,), np.uint64)
  if not path or not os.path.exists(path):
    return empty
  try:
    keys = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    logging.warning("frame check: ignoring unreadable cache %s (%s)", path, e)
    return empty
  if keys.dtype != np.uint64 or keys.ndim != 1:
    logging.warning("frame check: ignoring cache %s (%s %s, expected 1-d uint64)", path,
                    keys.dtype, keys.shape)
    return empty
  return keys


def save_cache(path: str, keys: np.ndarray) -> bool:
  """Writes `keys` (sorted uint64) to `path` atomically; False (a warning) if it cannot."""
  folder = os.path.dirname(path)
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-", suffix=".npy",
                                     delete=False) as f:
      tmp = f.name
      np.save(f, np.asarray(keys, np.uint64))
    os.replace(tmp, path)
    return True
  except OSError as e:
    logging.warning("frame check: cannot write the cache %s (%s); frames will be decoded "
                    "again next time", path, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    return False


def frame_key(path: str, st: os.stat_result) -> int:
  """64-bit key of a frame file: hash of (absolute path, size, mtime_ns, ctime_ns)."""
  text = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
  digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def _stat_keys(paths: Sequence[str]) -> tuple[list[int], dict[int, str]]:
  keys, errors = [], {}
  for i, p in enumerate(paths):
    try:
      keys.append(frame_key(p, os.stat(p)))
    except OSError as e:
      keys.append(0)
      errors[i] = f"cannot be read: {e.strerror or e}"
  return keys, errors


def frame_keys(paths: Sequence[str], num_threads: int | None = None
               ) -> tuple[np.ndarray, dict[int, str]]:
  """(N,) uint64 keys of `paths` and {index: error} of the files that cannot be stat'ed."""
  chunks = [paths[i:i + _STAT_CHUNK] for i in range(0, len(paths), _STAT_CHUNK)]
  keys: list[int] = []
  errors: dict[int, str] = {}
  with futures.ThreadPoolExecutor(max(1, num_threads or os.cpu_count() or 1)) as pool:
    for c, (k, e) in enumerate(pool.map(_stat_keys, chunks)):
      errors.update({c * _STAT_CHUNK + i: msg for i, msg in e.items()})
      keys.extend(k)
  return np.asarray(keys, np.uint64), errors


# ------------------------------------------------------------------ decoding


@functools.cache
def _reader():
  """(tensorflow, transforms, a tf.function path -> shape) imported and made on first use."""
  # pylint: disable=g-import-not-at-top  (TF only when frames must be decoded, see the docstring)
  import tensorflow as tf

  from data_pipelines import transforms
  # pylint: enable=g-import-not-at-top

  transforms.hide_gpus()
  return tf, transforms, tf.function(lambda p: tf.shape(transforms.read_frame(p)))


def clean_message(message: str) -> str:
  """TensorFlow's error text without its op / node decorations."""
  message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
  message = re.sub(r"\s*\[\[\{\{node [^}]*\}\}\]\]", "", message)
  message = re.sub(r"\s*\[Op:[^\]]*\]", "", message)
  return " ".join(message.split())


def decode_error(path: str) -> str | None:
  """TensorFlow's error reading `path` as the pipeline does, or None if it decodes."""
  tf, _, read = _reader()
  try:
    read(tf.constant(path))
  except tf.errors.OpError as e:
    return clean_message(e.message)
  return None


def decode_errors(paths: Sequence[str], num_threads: int | None = None) -> dict[str, str]:
  """{path: error} of the frames the pipeline cannot read; all decoded by a parallel map."""
  if not len(paths):
    return {}
  tf, transforms, _ = _reader()
  ok = np.zeros(len(paths), bool)
  calls = tf.data.AUTOTUNE if not num_threads else int(num_threads)
  t0 = time.perf_counter()
  for start in range(0, len(paths), _CHUNK):
    chunk = list(paths[start:start + _CHUNK])
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(chunk, tf.string)).enumerate()
    ds = ds.map(lambda i, p: (i, tf.shape(transforms.read_frame(p))[0]),
                num_parallel_calls=calls, deterministic=False)
    ds = ds.ignore_errors().batch(1024)
    for index, _ in ds.as_numpy_iterator():
      ok[start + index] = True
    if len(paths) > _CHUNK:
      done = start + len(chunk)
      logging.info("frame check: %d / %d frames decoded (%.0f frames/s)", done, len(paths),
                   done / max(time.perf_counter() - t0, 1e-9))
  errors = {}
  for i in np.flatnonzero(~ok):
    message = decode_error(paths[i])  # the message (the map drops failed elements silently)
    if message is not None:  # None: it reads now (changed while checking); not remembered
      errors[paths[i]] = message
  return errors


# ------------------------------------------------------------------ checks


def check_frames(paths: Iterable[str], *, cache_file: str | None = None,
                 num_threads: int | None = None) -> CheckResult:
  """Checks that every frame decodes (each distinct path once), skipping remembered ones.

  With `cache_file`, frames that are unchanged since they last decoded are not decoded again,
  and those that decode now are added to it.
  """
  t0 = time.perf_counter()
  paths = list(dict.fromkeys(paths))
  keys, stat_errors = frame_keys(paths, num_threads)
  cached = load_cache(cache_file)
  todo = ~np.isin(keys, cached) if len(cached) else np.ones(len(paths), bool)
  for i in stat_errors:
    todo[i] = False
  decode = [paths[i] for i in np.flatnonzero(todo)]
  errors = decode_errors(decode, num_threads)
  errors.update({paths[i]: msg for i, msg in stat_errors.items()})
  if cache_file and decode:
    good = np.asarray([k for k, p in zip(keys[todo], decode) if p not in errors], np.uint64)
    if len(good):
      save_cache(cache_file, np.union1d(load_cache(cache_file), good))
  bad = {p: errors[p] for p in paths if p in errors}
  return CheckResult(bad=bad, num_frames=len(paths), num_decoded=len(decode),
                     seconds=time.perf_counter() - t0, cache_file=cache_file)


def dataset_root(parts: NamedParts) -> str:
  """The deepest folder that holds every tracklet's first frame."""
  folders = {os.path.dirname(os.path.abspath(t.frames[0])) for _, ts in parts for t in ts
             if t.frames}
  return os.path.commonpath(sorted(folders)) if folders else os.getcwd()


def owners_of(paths: Iterable[str], parts: NamedParts) -> dict[str, Owner]:
  """{path: the first tracklet of `parts` that holds it}, for the given paths only."""
  wanted = set(paths)
  found: dict[str, Owner] = {}
  for part, tracklets in parts:
    for i, t in enumerate(tracklets):
      for f in t.frames:
        if f in wanted and f not in found:
          found[f] = Owner(part, i, t)
  return found


def bad_frames_error(bad: dict[str, str], owners: dict[str, Owner], *, checked: int,
                     where: str) -> DatasetError:
  """A DatasetError listing bad frames (up to MAX_LISTED) with their errors and tracklets."""
  lines = [f"{len(bad)} of {checked} frame files {where} are unreadable by the input "
           "pipeline (TensorFlow's decoder):"]
  last = None
  for path, message in list(bad.items())[:MAX_LISTED]:
    owner = owners.get(path)
    if owner is not None and owner != last:  # each tracklet once above its frames
      lines.append(f"  in {owner.describe()}:")
      last = owner
    lines.append(f"    {path}: {message}")
  if len(bad) > MAX_LISTED:
    lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
  lines.append("Replace or remove these frames; `python -m data_pipelines.inspect --verify` "
               "lists every bad frame of a dataset.")
  return DatasetError("\n".join(lines))


def run_parts(train: Split, selection: Split | None, test: Split, selection_label: str
              ) -> NamedParts:
  """The labelled tracklet lists a run reads: train, the selection query and gallery (unless
  the selection split is the test split) and the test query and gallery."""
  parts = [("train", train.train)]
  if selection is not None and selection is not test:
    parts += [(f"{selection_label} query", selection.query),
              (f"{selection_label} gallery", selection.gallery)]
  return parts + [("test query", test.query), ("test gallery", test.gallery)]


def check_tracklets(parts: NamedParts, *, cache_dir: str = "", root: str | None = None,
                    num_threads: int | None = None, where: str = "") -> CheckResult:
  """Checks every frame of `parts` ((label, tracklets) pairs); DatasetError if any is bad.

  Results are remembered in the cache file of `root` (default: `dataset_root(parts)`) in
  `cache_dir` ("" the default folder, "none" no cache).
  """
  paths = dict.fromkeys(f for _, ts in parts for t in ts for f in t.frames)
  if not paths:
    return CheckResult({}, 0, 0, 0.0, None)
  target = cache_path(root or dataset_root(parts), cache_dir)
  result = check_frames(paths, cache_file=target, num_threads=num_threads)
  rate = result.num_decoded / max(result.seconds, 1e-9)
  logging.info("frame check: %d frames in %.2f s, %d decoded (%.0f frames/s), cache %s",
               result.num_frames, result.seconds, result.num_decoded, rate, target or "off")
  if result.bad:
    raise bad_frames_error(result.bad, owners_of(result.bad, parts), checked=result.num_frames,
                           where=where or "of " + ", ".join(label for label, _ in parts))
  return result


def find_bad_frames(rows: Iterable[tuple[int, Sequence[int]]], tracklets: Sequence[Tracklet],
                    part: str, where: str) -> DatasetError | None:
  """The error naming the bad frames among `rows` ((tracklet index, frame indices) pairs),
  decoded now without the cache; None when they all read (the failure was elsewhere)."""
  owners: dict[str, Owner] = {}
  for t, frames in rows:
    tracklet = tracklets[int(t)]
    for j in frames:
      owners.setdefault(tracklet.frames[int(j)], Owner(part, int(t), tracklet))
  result = check_frames(owners)
  if not result.bad:
    return None
  return bad_frames_error(result.bad, owners, checked=result.num_frames, where=where)
