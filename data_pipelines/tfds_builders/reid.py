"""TFDS builders that store a video re-ID dataset as ArrayRecord files of whole tracklets.

One record per tracklet: `frames` (its frames' encoded JPEG/PNG bytes, stored as read from disk,
never re-encoded), `frame_names` (paths relative to the dataset root), `pid`, `camid`,
`num_frames` and `index` (its position in the reader's list). Splits are the reader's parts:
`train`, `query`, `gallery`, in the reader's order (shuffling is disabled, so record r is
tracklet r). The per-split pid / camid / num_frames arrays are also kept in the builder's
metadata, so the tracklet index can be rebuilt without reading any frame.

Builders read the native layout from the manual dir through `data_pipelines.readers`; the
synthetic builder renders the benchmark with `data_pipelines.synthetic` first. ArrayRecord gives
random access by tracklet, which identity-balanced sampling needs (see `TfdsSource` in
`tfds_builders/__init__.py`; `as_dataset()` does not read ArrayRecord in tfds 4.9.10).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from data_pipelines.tracklets import Split, Tracklet

PARTS = ("train", "query", "gallery")
FILE_FORMAT = "array_record"
VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(eq=False)
class ReidConfig(tfds.core.BuilderConfig):
  """A builder variant: keyword arguments for the reader (e.g. protocol, split_id)."""

  reader_kwargs: dict = dataclasses.field(default_factory=dict)


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      # Encoded bytes, kept as read from disk; decode only the sampled ones
      # (decoders={"frames": tfds.decode.SkipDecoding()}).
      "frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
      "frame_names": tfds.features.Sequence(tfds.features.Text()),
      "pid": tfds.features.Scalar(np.int32),
      "camid": tfds.features.Scalar(np.int32),
      "num_frames": tfds.features.Scalar(np.int32),
      "index": tfds.features.Scalar(np.int64),
  })


def relative_name(path: str, root: str) -> str:
  """`path` relative to `root` (unchanged if it is outside `root`)."""
  try:
    rel = os.path.relpath(path, root)
  except ValueError:
    return path
  return path if rel.startswith("..") else rel


def _examples(tracklets: Sequence[Tracklet], root: str) -> Iterator[tuple[int, dict]]:
  for i, t in enumerate(tracklets):
    yield i, {
        "frames": list(t.frames),  # paths: tfds stores the file bytes unchanged
        "frame_names": [relative_name(p, root) for p in t.frames],
        "pid": t.pid,
        "camid": t.camid,
        "num_frames": t.num_frames,
        "index": i,
    }


def split_metadata(split: Split, root: str) -> dict[str, Any]:
  """{part: {"pid", "camid", "num_frames", "first_frame"}} lists for the builder metadata.

  `first_frame` (the first frame's path relative to `root`) lets tracklets read from the native
  layout be matched to their records.
  """
  return {
      part: {
          "pid": [int(t.pid) for t in split.part(part)],
          "camid": [int(t.camid) for t in split.part(part)],
          "num_frames": [int(t.num_frames) for t in split.part(part)],
          "first_frame": [relative_name(t.frames[0], root) for t in split.part(part)],
      }
      for part in PARTS
  }


class ReidVideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common builder: subclasses set READER (a `data_pipelines.readers` name)."""

  VERSION = VERSION
  RELEASE_NOTES = {"1.0.0": "Whole tracklets as encoded frames (ArrayRecord)."}
  READER = ""

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 derives this through `importlib_resources` (not installed, not needed on
    # Python 3.11); the builders live in this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(self.__doc__ or "").strip(),
        features=features(),
        metadata=tfds.core.MetadataDict(),
        supervised_keys=None,
        disable_shuffling=True,  # record r of a split is tracklet r of the reader's list
    )

  def _read_split(self, dl_manager) -> tuple[Split, str]:
    """The reader's Split and the root the frame paths are relative to."""
    from data_pipelines import readers  # pylint: disable=g-import-not-at-top

    root = os.fspath(dl_manager.manual_dir)
    return readers.read_dataset(self.READER, root, **dict(self.builder_config.reader_kwargs)), root

  def _split_generators(self, dl_manager):
    split, root = self._read_split(dl_manager)
    self.info.metadata["reader"] = self.READER
    self.info.metadata["reader_kwargs"] = dict(self.builder_config.reader_kwargs)
    self.info.metadata["parts"] = split_metadata(split, root)
    self.info.metadata["root"] = root
    return {part: _examples(split.part(part), root) for part in PARTS}

  def _generate_examples(self, *args, **kwargs):  # Split generators return generators directly.
    raise NotImplementedError


def _instructions(reader: str) -> str:
  """The native layout the reader `reader` expects, rooted at the manual dir."""
  module = importlib.import_module(f"data_pipelines.readers.{reader}")
  layout = getattr(module, "LAYOUT", "").replace("<root>", "<manual_dir>")
  return (
      f"Put the dataset in its native layout in the manual dir (`--manual_dir`, or\n"
      f"`DownloadConfig(manual_dir=...)`), as read by data_pipelines/readers/{reader}.py:\n"
      f"{layout}"
  )


def _default_config() -> list[ReidConfig]:
  return [ReidConfig(name="default", reader_kwargs={})]


class ReidMars(ReidVideoBuilder):
  """MARS video re-ID (tracklets of encoded frames)."""

  READER = "mars"
  BUILDER_CONFIGS = [
      ReidConfig(name="official", reader_kwargs={"protocol": "official"}),
      ReidConfig(name="torchreid", reader_kwargs={"protocol": "torchreid"}),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("mars")


class ReidDukev(ReidVideoBuilder):
  """DukeMTMC-VideoReID (tracklets of encoded frames)."""

  READER = "dukev"
  BUILDER_CONFIGS = [
      ReidConfig(name="official", reader_kwargs={"protocol": "official"}),
      ReidConfig(name="torchreid", reader_kwargs={"protocol": "torchreid"}),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("dukev")


class ReidLsvid(ReidVideoBuilder):
  """LS-VID (tracklets of encoded frames)."""

  READER = "lsvid"
  BUILDER_CONFIGS = _default_config()
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("lsvid")


class ReidIlidsvid(ReidVideoBuilder):
  """iLIDS-VID, one of the 10 standard splits (tracklets of encoded frames)."""

  READER = "ilidsvid"
  BUILDER_CONFIGS = [
      ReidConfig(name=f"split{i}", reader_kwargs={"split_id": i}) for i in range(10)
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("ilidsvid")


class ReidPrid2011(ReidVideoBuilder):
  """PRID2011 multi-shot, one of the 10 standard splits (tracklets of encoded frames)."""

  READER = "prid2011"
  BUILDER_CONFIGS = [
      ReidConfig(name=f"split{i}", reader_kwargs={"split_id": i}) for i in range(10)
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("prid2011")


def synthetic_config(knobs: dict | None = None) -> ReidConfig:
  """A builder config for synthetic knobs, named by a hash of the full knob set."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

  full = dataclasses.asdict(synthetic.make_spec(dict(knobs or {})))
  digest = hashlib.sha1(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:12]
  return ReidConfig(name=f"k{digest}", reader_kwargs={"knobs": full})


class ReidSynthetic(ReidVideoBuilder):
  """The synthetic video re-ID benchmark (rendered, then stored as tracklets)."""

  READER = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = None
  BUILDER_CONFIGS = [ReidConfig(name="default", reader_kwargs={"knobs": {}})]

  def _read_split(self, dl_manager):
    from data_pipelines import readers  # pylint: disable=g-import-not-at-top
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

    knobs = dict(self.builder_config.reader_kwargs.get("knobs", {}))
    layout = knobs.get("layout", "mars")
    root = os.path.join(os.fspath(dl_manager.download_dir), f"synthetic_{self.builder_config.name}")
    root = synthetic.ensure_generated(root, knobs)
    split = readers.read_dataset(layout, root)
    return Split("synthetic", split.train, split.query, split.gallery), root


BUILDERS = {
    "mars": ReidMars,
    "dukev": ReidDukev,
    "lsvid": ReidLsvid,
    "ilidsvid": ReidIlidsvid,
    "prid2011": ReidPrid2011,
    "synthetic": ReidSynthetic,
}
