"""TFDS ArrayRecord storage: a tiny DukeV layout in tmp_path, built, read back, fed to the
pipeline; the batches must equal those read from the original files."""

import os

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from configs import synthetic  # pylint: disable=g-import-not-at-top
from data_pipelines import pipeline
from data_pipelines import readers
from data_pipelines import tfds_builders
from data_pipelines.tfds_builders import reid

H, W = 32, 16


def _write_tracklet(root, part, pid, track, cam, n, rng):
  folder = os.path.join(root, part, f"{pid:04d}", f"{track:04d}")
  os.makedirs(folder)
  for j in range(n):
    img = rng.integers(0, 256, (H + 8, W + 4, 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f"{pid:04d}_C{cam}_F{j + 1:04d}_X{track}.jpg"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  base = tmp_path_factory.mktemp("tfds")
  root = os.path.join(base, "DukeMTMC-VideoReID")
  rng = np.random.default_rng(0)
  for pid in range(1, 5):
    _write_tracklet(root, "train", pid, 1, 1, 2 + pid, rng)
    _write_tracklet(root, "train", pid, 2, 2, 1, rng)
  for pid in (7, 8):
    _write_tracklet(root, "query", pid, 1, 1, 4, rng)
    _write_tracklet(root, "gallery", pid, 1, 1, 4, rng)
    _write_tracklet(root, "gallery", pid, 2, 2, 7, rng)
  _write_tracklet(root, "gallery", 0, 3, 3, 2, rng)  # a distractor
  config = synthetic.get_config("smoke")
  config.dataset.name = "dukev"
  config.dataset.root = root
  config.dataset.protocol = "official"
  config.data.tfds_data_dir = os.path.join(base, "data_dir")
  config.data.height, config.data.width = H, W
  config.data.num_ids_per_batch = 2
  config.data.num_tracklets_per_id = 2
  config.data.eval_batch_size = 4
  config.data.num_parallel_calls = 2
  config.optim.steps_per_epoch = -1
  builder = tfds_builders.prepare(config)
  config.data.source = "tfds"
  return config, builder


def test_records_hold_the_reader_tracklets_in_order(built):
  config, builder = built
  native = readers.read_dataset("dukev", config.dataset.root, protocol="official")
  split = tfds_builders.read_split(config)
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

  for part in ("train", "query", "gallery"):
    ours, theirs = split.part(part), native.part(part)
    assert builder.info.splits[part].num_examples == len(theirs)
    assert [(t.pid, t.camid, t.num_frames) for t in ours] == [
        (t.pid, t.camid, t.num_frames) for t in theirs]
    src = array_record_data_source.ArrayRecordDataSource(
        builder.info.splits[part].file_instructions)
    for r, t in enumerate(theirs):
      ex = builder.info.features.deserialize_example(
          src[r], decoders={"frames": tfds.decode.SkipDecoding()})
      assert int(ex["index"]) == r and int(ex["pid"]) == t.pid and int(ex["camid"]) == t.camid
      stored = [bytes(b) for b in ex["frames"].numpy()]
      on_disk = [open(p, "rb").read() for p in t.frames]
      assert stored == on_disk  # encoded bytes kept unchanged
      names = [n.decode() for n in ex["frame_names"].numpy()]
      assert names == [os.path.relpath(p, config.dataset.root) for p in t.frames]
      assert ours[r].frames[0] == f"tfds:{part}/{r}/0"


def test_tfds_pipeline_equals_file_pipeline(built):
  config, _ = built
  split = tfds_builders.read_split(config)
  native = readers.read_dataset("dukev", config.dataset.root, protocol="official")
  files_config = config.copy_and_resolve_references()
  files_config.data.source = "files"
  a = pipeline.train_iterator(split.train, config, start_step=3, process_index=0,
                              process_count=1)
  b = pipeline.train_iterator(native.train, files_config, start_step=3, process_index=0,
                              process_count=1)
  for _ in range(2):
    x, y = next(a), next(b)
    for k in ("frames", "pid", "camid"):
      np.testing.assert_array_equal(x[k], y[k])
  # Tracklets read from the native layout are matched to their records.
  c = next(pipeline.train_iterator(native.train, config, start_step=3, process_index=0,
                                   process_count=1))
  first = next(pipeline.train_iterator(native.train, files_config, start_step=3,
                                       process_index=0, process_count=1))
  for k in ("frames", "pid", "camid"):
    np.testing.assert_array_equal(c[k], first[k])
  ea = list(pipeline.eval_iterator(split.gallery, config, sampling="all_frames",
                                   process_index=1, process_count=2))
  eb = list(pipeline.eval_iterator(native.gallery, files_config, sampling="all_frames",
                                   process_index=1, process_count=2))
  assert len(ea) == len(eb) > 0
  for x, y in zip(ea, eb):
    for k in ("frames", "mask", "tracklet_index"):
      np.testing.assert_array_equal(x[k], y[k])


def test_distractor_option_and_errors(built):
  config, _ = built
  no_dist = config.copy_and_resolve_references()
  no_dist.dataset.distractors = False
  full = tfds_builders.read_split(config)
  less = tfds_builders.read_split(no_dist)
  assert sum(t.pid == 0 for t in full.gallery) == 1
  assert len(less.gallery) == len(full.gallery) - 1
  assert all(t.pid != 0 for t in less.gallery)

  other = config.copy_and_resolve_references()
  other.dataset.protocol = "torchreid"  # a builder variant that was never prepared
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tfds_builders.read_split(other)
  # A file-path tracklet that is not in the dataset is an error naming its first frame.
  from data_pipelines.tracklets import Tracklet  # pylint: disable=g-import-not-at-top

  stranger = Tracklet(("/elsewhere/0001_C1_F0001_X1.jpg",), 0, 0)
  with pytest.raises(ValueError, match="/elsewhere/0001_C1_F0001_X1.jpg.*not in the TFDS"):
    pipeline.eval_iterator([stranger], config, process_index=0, process_count=1)
  bad = config.copy_and_resolve_references()
  bad.dataset.name = "market1501"
  with pytest.raises(ValueError, match="has no TFDS builder"):
    tfds_builders.get_builder(bad)


def test_builder_variants_and_instructions():
  config = synthetic.get_config("smoke")
  config.dataset.name = "ilidsvid"
  config.dataset.split_id = 7
  assert tfds_builders.builder_config(config).reader_kwargs == {"split_id": 7}
  config.dataset.name = "mars"
  config.dataset.protocol = "torchreid"
  assert tfds_builders.builder_config(config).name == "torchreid"
  for name in ("mars", "dukev", "lsvid", "ilidsvid", "prid2011"):
    text = reid.BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "<manual_dir>" in text and f"readers/{name}.py" in text
  assert "bbox_train" in reid.ReidMars.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert "multi_shot" in reid.ReidPrid2011.MANUAL_DOWNLOAD_INSTRUCTIONS
  # Synthetic variants are named by their knobs.
  a = reid.synthetic_config({"num_train_ids": 4})
  b = reid.synthetic_config({"num_train_ids": 5})
  assert a.name != b.name and a.name == reid.synthetic_config({"num_train_ids": 4}).name


def test_frame_refs_round_trip():
  assert tfds_builders.parse_ref(tfds_builders.frame_ref("query", 12, 3)) == ("query", 12, 3)
  with pytest.raises(ValueError, match="tfds:<part>/<record>/<frame>"):
    tfds_builders.parse_ref("/data/mars/0001C1T0001F001.jpg")


def test_synthetic_builder_renders_then_stores(tmp_path):
  pytest.importorskip("data_pipelines.synthetic.generator")
  config = synthetic.get_config("smoke")
  config.dataset.synthetic = dict(
      num_train_ids=4, num_test_ids=2, height=H, width=W, short_max_length=4, max_length=6,
      num_cameras=2, min_cameras_per_id=2, max_cameras_per_id=2, num_distractor_tracklets=1,
      num_junk_tracklets=1)
  config.data.tfds_data_dir = str(tmp_path / "data_dir")
  builder = tfds_builders.prepare(config)
  split = tfds_builders.read_split(config)
  assert builder.builder_config.name.startswith("k")
  assert split.num_train_pids == 4
  for part in ("train", "query", "gallery"):
    assert builder.info.splits[part].num_examples == len(split.part(part)) > 0


def test_split_from_tfds_needs_no_native_layout(built):
  import data_pipelines  # pylint: disable=g-import-not-at-top

  config, _ = built
  config = config.copy_and_resolve_references()
  config.dataset.root = "/nonexistent/native/layout"
  split = data_pipelines.split_from_config(config)
  assert split.summary() == tfds_builders.read_split(config).summary()
  assert all(f.startswith("tfds:") for t in split.query for f in t.frames)
  config.data.source = "files"
  with pytest.raises(readers.DatasetError, match="/nonexistent/native/layout"):
    data_pipelines.split_from_config(config)
  config.data.source = "gcs"
  with pytest.raises(ValueError, match="config.data.source"):
    data_pipelines.split_from_config(config)
