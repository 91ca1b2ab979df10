"""TFDS storage of the re-ID datasets (`config.data.source == "tfds"`).

    builder = tfds_builders.prepare(config)          # once: native layout -> ArrayRecord
    split = tfds_builders.read_split(config)         # Split whose frames are record references
    it = pipeline.train_iterator(split.train, config)

`config.data.tfds_data_dir` is the TFDS data dir (local or remote, e.g. gs://...); the manual dir
defaults to `config.dataset.root`. The builder variant follows the config: MARS / DukeV
`protocol` ("official" | "torchreid"), iLIDS-VID / PRID2011 `split_id` ("split0".."split9"),
synthetic knobs (a hash of them). Tracklets read back by `read_split` carry frame references
`tfds:<part>/<record>/<frame>` instead of paths; `TfdsSource` (used by the pipeline) reads a
tracklet's record by index and decodes only the sampled frames. Tracklets from the reader
(`data_pipelines.get_split`) are accepted too: they are matched to their records by the first
frame's path relative to the dataset root.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import tensorflow as tf

from data_pipelines.tracklets import Split, Tracklet

REF_PREFIX = "tfds:"
_REF = re.compile(r"^tfds:(train|query|gallery)/(\d+)/(\d+)$")
PARTS = ("train", "query", "gallery")
# Datasets whose gallery has pid 0 distractors (config.dataset.distractors=False drops them).
_WITH_DISTRACTORS = ("mars", "dukev", "synthetic")


def frame_ref(part: str, record: int, frame: int) -> str:
  return f"{REF_PREFIX}{part}/{record}/{frame}"


def parse_ref(ref: str) -> tuple[str, int, int]:
  """'tfds:train/12/0' -> ('train', 12, 0)."""
  m = _REF.match(ref)
  if not m:
    raise ValueError(
        f"frame {ref!r} is not a TFDS frame reference 'tfds:<part>/<record>/<frame>': with "
        "config.data.source='tfds' the tracklets must come from tfds_builders.read_split"
    )
  return m.group(1), int(m.group(2)), int(m.group(3))


def builder_class(name: str):
  from data_pipelines.tfds_builders import reid  # pylint: disable=g-import-not-at-top

  try:
    return reid.BUILDERS[name]
  except KeyError:
    raise ValueError(
        f"config.dataset.name={name!r} has no TFDS builder: expected one of {sorted(reid.BUILDERS)}"
    ) from None


def builder_config(config):
  """The builder variant (`reid.ReidConfig`) for `config.dataset`."""
  from data_pipelines.tfds_builders import reid  # pylint: disable=g-import-not-at-top

  ds = config.dataset
  cls = builder_class(ds.name)
  if ds.name == "synthetic":
    knobs = ds.get("synthetic", None)
    knobs = knobs.to_dict() if hasattr(knobs, "to_dict") else dict(knobs or {})
    return reid.synthetic_config(knobs)
  if ds.name in ("mars", "dukev"):
    wanted = ds.get("protocol", "official")
  elif ds.name in ("ilidsvid", "prid2011"):
    wanted = f"split{int(ds.get('split_id', 0))}"
  else:
    wanted = "default"
  for c in cls.BUILDER_CONFIGS:
    if c.name == wanted:
      return c
  raise ValueError(
      f"no {ds.name} TFDS builder config {wanted!r}: expected one of "
      f"{[c.name for c in cls.BUILDER_CONFIGS]}"
  )


def _data_dir(config, data_dir: str | None) -> str:
  data_dir = data_dir or config.data.get("tfds_data_dir", "")
  if not data_dir:
    raise ValueError("config.data.tfds_data_dir is empty: set it to the TFDS data dir")
  return data_dir


def get_builder(config, data_dir: str | None = None):
  """The (maybe not yet prepared) ArrayRecord builder for `config`."""
  from data_pipelines.tfds_builders import reid  # pylint: disable=g-import-not-at-top

  cls = builder_class(config.dataset.name)
  return cls(data_dir=_data_dir(config, data_dir), config=builder_config(config),
             file_format=reid.FILE_FORMAT)


def prepare(config, *, manual_dir: str | None = None, data_dir: str | None = None):
  """Builds the dataset from its native layout (manual dir, default `config.dataset.root`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = get_builder(config, data_dir)
  manual_dir = manual_dir or config.dataset.get("root", "") or None
  if config.dataset.name != "synthetic" and not manual_dir:
    raise ValueError(
        f"no manual dir for {config.dataset.name}: set config.dataset.root to the native layout"
    )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  )
  return builder


def _prepared(config, data_dir: str | None = None):
  builder = get_builder(config, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {builder.name}/{builder.builder_config.name} is not prepared in "
        f"{builder.data_dir_root}: run tfds_builders.prepare(config) first"
    )
  return builder


def read_split(config, data_dir: str | None = None) -> Split:
  """The tracklet index from the builder's metadata (no frame is read).

  Frames are references `tfds:<part>/<record>/<frame>`; pids and camids are the reader's (train
  pids relabelled). `config.dataset.distractors=False` drops pid 0 from the gallery.
  """
  builder = _prepared(config, data_dir)
  meta = builder.info.metadata.get("parts")
  if not meta:
    raise ValueError(f"{builder.data_dir}: metadata.json has no 'parts' (not built by stmn_jax?)")
  parts = {}
  for part in PARTS:
    m = meta[part]
    parts[part] = tuple(
        Tracklet(tuple(frame_ref(part, r, j) for j in range(n)), int(pid), int(cam))
        for r, (pid, cam, n) in enumerate(zip(m["pid"], m["camid"], m["num_frames"]))
    )
  gallery = parts["gallery"]
  if config.dataset.name in _WITH_DISTRACTORS and not config.dataset.get("distractors", True):
    gallery = tuple(t for t in gallery if t.pid != 0)
  return Split(config.dataset.name, parts["train"], parts["query"], gallery)


def _record_refs(tracklets: Sequence[Tracklet], builder, config) -> list[tuple[str, int, int]]:
  """(part, record, 0) of each tracklet: parsed from `read_split` references, or, for tracklets
  read from the native layout, matched by their first frame's path relative to
  `config.dataset.root` (or the root the builder was built from)."""
  by_name: dict[str, tuple[str, int, int]] | None = None
  roots = [r for r in (config.dataset.get("root", ""), builder.info.metadata.get("root", "")) if r]
  out = []
  for t in tracklets:
    if t.frames[0].startswith(REF_PREFIX):
      out.append(parse_ref(t.frames[0]))
      continue
    if by_name is None:
      from data_pipelines.tfds_builders import reid  # pylint: disable=g-import-not-at-top

      meta = builder.info.metadata.get("parts") or {}
      if not all("first_frame" in meta.get(p, {}) for p in PARTS):
        raise ValueError(
            f"{builder.data_dir}: metadata has no first_frame lists (built by an older version): "
            "rebuild it, or use the tracklets of tfds_builders.read_split"
        )
      by_name = {}
      for p in PARTS:
        for r, (name, n) in enumerate(zip(meta[p]["first_frame"], meta[p]["num_frames"])):
          by_name.setdefault(name, (p, r, n))
    hit = None
    for root in roots:
      hit = by_name.get(reid.relative_name(t.frames[0], root))
      if hit:
        break
    if hit is None or hit[2] != t.num_frames:
      raise ValueError(
          f"tracklet starting at {t.frames[0]!r} ({t.num_frames} frames) is not in the TFDS "
          f"dataset {builder.data_dir} (config.data.source='tfds'): prepare it from this root "
          "or use the tracklets of tfds_builders.read_split"
      )
    out.append((hit[0], hit[1], 0))
  return out


class TfdsSource:
  """Frames of tracklets, read by record index from the ArrayRecord files.

  Tracklets come from `read_split` (frame references) or from the reader on the native layout
  the builder was prepared from (matched by their first frame's relative path).

  Each clip reads its tracklet's record (a `tf.numpy_function` over
  `ArrayRecordDataSource`), parses it with the frames left encoded (`SkipDecoding`) and decodes
  only the sampled frames.
  """

  def __init__(self, tracklets: Sequence[Tracklet], config, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

    builder = _prepared(config, data_dir)
    self._features = builder.info.features
    self._decoders = {"frames": tfds.decode.SkipDecoding()}
    refs = _record_refs(tracklets, builder, config)
    self._part = tf.constant(np.asarray([PARTS.index(p) for p, _, _ in refs], np.int64))
    self._record = tf.constant(np.asarray([r for _, r, _ in refs], np.int64))
    used = sorted({p for p, _, _ in refs})
    self._sources = {}
    for p in used:
      files = builder.info.splits[p].file_instructions
      self._sources[PARTS.index(p)] = array_record_data_source.ArrayRecordDataSource(files)

  def _fetch(self, part: np.int64, record: np.int64) -> bytes:
    return self._sources[int(part)][int(record)]

  def load(self, tracklet, frames, height, width):
    from data_pipelines import transforms  # pylint: disable=g-import-not-at-top

    part = tf.gather(self._part, tracklet)
    record = tf.gather(self._record, tracklet)
    raw = tf.numpy_function(self._fetch, [part, record], tf.string, stateful=False)
    raw.set_shape([])
    example = self._features.deserialize_example(raw, decoders=self._decoders)
    check = tf.debugging.assert_equal(
        example["index"], record, message="TFDS record is not the expected tracklet")
    with tf.control_dependencies([check]):
      encoded = tf.gather(example["frames"], frames)
    return transforms.decode_clip(encoded, height, width)


__all__ = ["prepare", "read_split", "get_builder", "builder_config", "TfdsSource", "frame_ref",
           "parse_ref"]
