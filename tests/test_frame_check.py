"""Frames checked to decode before a run (`data_pipelines.frame_check`), named when they fail.

Bad frames: a JPEG with a valid header (SOI, APP0, tables, SOS) whose entropy-coded data holds an
APP1 marker claiming more bytes than the file has (PIL decodes it, TensorFlow's libjpeg does
not), and a truncated JPEG.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

import data_pipelines
from configs import synthetic
from data_pipelines import frame_check
from data_pipelines import inspect as inspect_cli
from data_pipelines import pipeline
from data_pipelines import sampling
from data_pipelines.readers import common
from data_pipelines.readers.common import DatasetError
from data_pipelines.tracklets import Tracklet
from stmn_jax import run_setup
from stmn_jax import train
from stmn_jax import train_state
from tests.test_readers import write_mars

tf = pytest.importorskip("tensorflow")


def corrupt_data(path: str) -> None:
  """Keeps the JPEG header, breaks the entropy-coded data (PIL still decodes it)."""
  with open(path, "rb") as f:
    data = f.read()
  sos = data.index(b"\xff\xda")
  start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
  mid = (start + len(data) - 2) // 2
  with open(path, "wb") as f:
    f.write(data[:mid] + b"\xff\xe1\xff\xff" + data[mid + 4:])


def truncate(path: str) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def write_jpeg(path: str, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path, quality=90)
  return path


def _config(tmp_path, **data):
  config = synthetic.get_config("smoke")
  config.dataset.root = str(tmp_path / "data")
  config.data.frame_check_cache = str(tmp_path / "cache")
  for k, v in data.items():
    config.data[k] = v
  return config


def _splits(config):
  """(train split, test split) as the run reads them (generates the smoke data once)."""
  train_split, _, test_split, _ = run_setup.load_data(config)
  return train_split, test_split


def test_corrupt_frame_passes_pil_but_not_the_pipeline_decoder(tmp_path):
  bad = write_jpeg(str(tmp_path / "bad.jpg"))
  corrupt_data(bad)
  cut = write_jpeg(str(tmp_path / "cut.jpg"))
  truncate(cut)
  with open(bad, "rb") as f:
    assert f.read(4) == b"\xff\xd8\xff\xe0"  # SOI + APP0: it starts like a good JPEG
  with Image.open(bad) as im:  # PIL fills the broken scan and reports success
    im.load()
  common.verify_images([bad])  # so did the readers' PIL check (inspect --verify before)
  errors = frame_check.decode_errors([bad, cut, write_jpeg(str(tmp_path / "good.jpg"))])
  assert list(errors) == [bad, cut]
  assert all("jpeg::Uncompress failed" in m and "{{" not in m for m in errors.values())


def test_prepare_run_names_a_bad_training_frame_before_any_compilation(tmp_path, monkeypatch):
  config = _config(tmp_path)
  train_split, _ = _splits(config)
  i, t = next((i, t) for i, t in enumerate(train_split.train) if t.num_frames >= 3)
  corrupt_data(t.frames[1])
  with pytest.raises(DatasetError) as info:
    run_setup.prepare_run(config)
  message = str(info.value)
  assert f"{t.frames[1]}: jpeg::Uncompress failed" in message
  assert (f"train tracklet {i} (pid {t.pid}, camera {t.camid}, {t.num_frames} frames, "
          f"first frame {t.frames[0]!r})") in message
  assert message.startswith("1 of ")

  def compile_model(*args, **kwargs):
    raise AssertionError("the model was built before the frame check")

  monkeypatch.setattr(train_state, "create_train_state", compile_model)
  workdir = str(tmp_path / "work")
  with pytest.raises(DatasetError, match="train tracklet"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_prepare_run_names_a_bad_test_frame(tmp_path):
  config = _config(tmp_path)
  _, test_split = _splits(config)
  j, t = next((j, t) for j, t in enumerate(test_split.query) if t.num_frames >= 2)
  truncate(t.frames[-1])
  with pytest.raises(DatasetError) as info:
    run_setup.prepare_run(config)
  assert t.frames[-1] in str(info.value)
  assert f"test query tracklet {j} (pid {t.pid}, camera {t.camid}" in str(info.value)
  # Off: the set-up passes (the pipeline names the frame when it reads it, tests below).
  config.data.check_frames = False
  assert run_setup.prepare_run(config).test_split is not None


def test_tfds_source_is_not_checked(tmp_path):
  config = _config(tmp_path)
  train_split, _ = _splits(config)
  corrupt_data(train_split.train[0].frames[0])
  split = data_pipelines.get_split(config.dataset)
  config.data.source = "tfds"  # records were encoded by the builder: nothing to check here
  assert run_setup.prepare_run(config, split=split).num_classes > 0


def test_train_pipeline_names_the_file_when_the_check_is_off(tmp_path):
  config = _config(tmp_path, check_frames=False)
  setup = run_setup.prepare_run(config)
  tracklets = setup.train_split.train
  d = config.data
  index = sampling.IdentityIndex.build([t.pid for t in tracklets], [t.camid for t in tracklets])
  plan = sampling.train_batch(
      index, np.array([t.num_frames for t in tracklets]), 1, seed=config.seed,
      seq_len=d.seq_len, num_ids_per_batch=d.num_ids_per_batch,
      num_tracklets_per_id=d.num_tracklets_per_id,
      steps_per_epoch=pipeline.steps_per_epoch(index.num_ids, config),
      prefer_cross_camera=d.prefer_cross_camera)
  t = int(plan.tracklets[3])
  bad = tracklets[t].frames[int(plan.frames[3, 2])]  # read by row 3 of step 1
  corrupt_data(bad)
  it = pipeline.train_iterator(tracklets, config, start_step=1, process_index=0,
                               process_count=1)
  with pytest.raises(DatasetError) as info:
    next(it)
  message = str(info.value)
  assert f"{bad}: jpeg::Uncompress failed" in message
  assert "in the train batch of step 1" in message
  assert f"train tracklet {t} (pid {tracklets[t].pid}" in message
  assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)


def test_eval_pipeline_names_the_file_when_the_check_is_off(tmp_path):
  config = _config(tmp_path, check_frames=False)
  _, test_split = _splits(config)
  query = test_split.query
  truncate(query[2].frames[0])  # every eval sampling reads a tracklet's first frame
  ev = pipeline.eval_iterator(query, config, process_index=0, process_count=1)
  with pytest.raises(DatasetError) as info:
    list(ev)
  assert f"{query[2].frames[0]}: jpeg::Uncompress failed" in str(info.value)
  assert f"eval tracklet 2 (pid {query[2].pid}" in str(info.value)
  assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)


def test_cache_skips_unchanged_frames_and_decodes_changed_ones(tmp_path, monkeypatch):
  frames = [write_jpeg(str(tmp_path / f"f{i}.jpg"), i) for i in range(6)]
  bad = write_jpeg(str(tmp_path / "bad.jpg"))
  corrupt_data(bad)
  target = frame_check.cache_path(str(tmp_path), str(tmp_path / "cache"))
  assert os.path.basename(target).startswith(os.path.basename(str(tmp_path)) + "-")
  first = frame_check.check_frames(frames + [bad], cache_file=target)
  assert first.num_decoded == 7 and list(first.bad) == [bad]
  keys = np.load(target, allow_pickle=False)
  assert keys.dtype == np.uint64 and keys.shape == (6,)  # good frames only

  decoded: list[str] = []
  real = frame_check.decode_errors

  def counting(paths, num_threads=None):
    decoded.extend(paths)
    return real(paths, num_threads)

  monkeypatch.setattr(frame_check, "decode_errors", counting)
  second = frame_check.check_frames(frames + [bad], cache_file=target)
  assert decoded == [bad] and list(second.bad) == [bad]  # a bad frame is checked every time
  # Touched: decoded again.
  decoded.clear()
  st = os.stat(frames[2])
  os.utime(frames[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert frame_check.check_frames(frames, cache_file=target).num_decoded == 1
  assert decoded == [frames[2]]
  # Broken with its size and mtime restored (as `cp -p` or rsync would): the ctime changed.
  decoded.clear()
  st = os.stat(frames[4])
  time.sleep(0.05)  # past the file system's timestamp granularity
  with open(frames[4], "rb") as f:
    data = f.read()
  with open(frames[4], "wb") as f:
    f.write(data)
  corrupt_data(frames[4])
  os.utime(frames[4], ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.stat(frames[4]).st_size == st.st_size
  third = frame_check.check_frames(frames, cache_file=target)
  assert decoded == [frames[4]] and list(third.bad) == [frames[4]]
  # Nothing changed, nothing bad: no decoding at all.
  decoded.clear()
  fourth = frame_check.check_frames(frames[:4], cache_file=target)
  assert decoded == [] and fourth.num_decoded == 0 and not fourth.bad


def test_prepare_run_second_check_decodes_nothing(tmp_path, monkeypatch):
  config = _config(tmp_path)
  run_setup.prepare_run(config)
  calls: list[int] = []
  monkeypatch.setattr(frame_check, "decode_errors",
                      lambda paths, num_threads=None: calls.append(len(paths)) or {})
  run_setup.prepare_run(config)
  assert calls == [0]


def test_parallel_check_finds_every_bad_frame(tmp_path):
  paths, bad = [], []
  for i in range(60):
    p = write_jpeg(str(tmp_path / f"f{i:02d}.jpg"), i)
    if i % 4 == 1:
      corrupt_data(p)
      bad.append(p)
    elif i % 4 == 3 and i < 30:
      truncate(p)
      bad.append(p)
    paths.append(p)
  text = str(tmp_path / "text.jpg")
  with open(text, "w") as f:
    f.write("not an image")
  missing = str(tmp_path / "missing.jpg")
  paths += [text, missing]
  bad += [text, missing]
  result = frame_check.check_frames(paths, num_threads=4)
  assert list(result.bad) == bad and result.num_frames == 62
  assert "not a JPEG/PNG" in result.bad[text]
  assert "No such file" in result.bad[missing]
  # As tracklets: the error lists MAX_LISTED frames with their tracklets, then a count.
  tracklets = [Tracklet(tuple(paths[k:k + 4]), k // 4, 0) for k in range(0, 62, 4)]
  with pytest.raises(DatasetError) as info:
    frame_check.check_tracklets([("train", tracklets)], cache_dir=frame_check.NO_CACHE)
  message = str(info.value)
  assert message.startswith(f"{len(bad)} of 62 frame files of train are unreadable")
  assert all(p in message for p in bad[:frame_check.MAX_LISTED])
  assert bad[frame_check.MAX_LISTED] not in message
  assert f"... and {len(bad) - frame_check.MAX_LISTED} more" in message
  assert f"in train tracklet 0 (pid 0, camera 0, 4 frames, first frame {paths[0]!r}):" in message


def test_inspect_verify_uses_the_pipeline_decoder(tmp_path, capsys):
  root = write_mars(str(tmp_path / "MARS"))
  folder = os.path.join(root, "bbox_train", "0003")
  bad = write_jpeg(os.path.join(folder, sorted(os.listdir(folder))[0]))
  corrupt_data(bad)
  args = ["--dataset=mars", f"--root={root}", "--verify",
          f"--frame-check-cache={tmp_path / 'cache'}"]
  assert inspect_cli.main(args) == 2
  err = capsys.readouterr().err
  assert f"{bad}: jpeg::Uncompress failed" in err and "train tracklet" in err
