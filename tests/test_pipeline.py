"""End-to-end tf.data train / eval iterators on tiny PNG frames written to tmp_path."""

import os

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from configs import synthetic  # pylint: disable=g-import-not-at-top
from data_pipelines import pipeline
from data_pipelines import sampling
from data_pipelines.readers.common import DatasetError
from data_pipelines.tracklets import Tracklet

H, W = 32, 16
MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)


def _frame_value(t, j):
  """Each frame is a constant colour that identifies (tracklet t, frame j)."""
  return np.array([(t * 7) % 256, (j * 11) % 256, (t + j) % 256], np.uint8)


@pytest.fixture(scope="module")
def tracklets(tmp_path_factory):
  root = tmp_path_factory.mktemp("frames")
  lengths = [1, 3, 8, 5, 12, 2, 7, 9, 4, 6, 10, 3]  # 6 ids x 2 cameras
  out = []
  for t, n in enumerate(lengths):
    pid, cam = t // 2, t % 2
    paths = []
    for j in range(n):
      p = os.path.join(root, f"{pid:04d}C{cam}T{t:02d}F{j:03d}.png")
      Image.fromarray(np.broadcast_to(_frame_value(t, j), (H, W, 3)).copy()).save(p)
      paths.append(p)
    out.append(Tracklet(tuple(paths), pid, cam))
  return tuple(out)


def _config(**data):
  config = synthetic.get_config("smoke")
  config.data.height, config.data.width = H, W
  config.data.seq_len = 4
  config.data.num_ids_per_batch = 2
  config.data.num_tracklets_per_id = 2
  config.data.eval_batch_size = 4
  config.data.num_parallel_calls = 2
  config.optim.steps_per_epoch = -1
  config.seed = 5
  for k, v in data.items():
    config.data[k] = v
  return config


def _expected_frames(t, frame_idx):
  return np.stack([(_frame_value(t, int(j)) / 255.0 - MEAN) / STD for j in frame_idx])


def test_train_batches_load_exactly_the_sampled_frames(tracklets):
  config = _config(flip_prob=0.0, erasing_prob=0.0)
  it = pipeline.train_iterator(tracklets, config, process_index=0, process_count=1)
  index = sampling.IdentityIndex.build([t.pid for t in tracklets], [t.camid for t in tracklets])
  nf = np.array([t.num_frames for t in tracklets])
  spe = pipeline.steps_per_epoch(6, config)
  assert spe == 3
  for step in range(2):
    batch = next(it)
    assert batch["frames"].shape == (4, 4, H, W, 3) and batch["frames"].dtype == np.float32
    assert batch["pid"].dtype == np.int32 and batch["camid"].dtype == np.int32
    plan = sampling.train_batch(index, nf, step, seed=5, seq_len=4, num_ids_per_batch=2,
                                num_tracklets_per_id=2, steps_per_epoch=spe)
    np.testing.assert_array_equal(batch["pid"], [tracklets[t].pid for t in plan.tracklets])
    np.testing.assert_array_equal(batch["camid"], [tracklets[t].camid for t in plan.tracklets])
    for b, (t, f) in enumerate(zip(plan.tracklets, plan.frames)):
      expect = np.broadcast_to(_expected_frames(t, f)[:, None, None, :], (4, H, W, 3))
      np.testing.assert_allclose(batch["frames"][b], expect, atol=1e-5)


def test_train_is_deterministic_resumable_and_host_split(tracklets):
  config = _config()  # flip and erasing on
  full = pipeline.train_iterator(tracklets, config, process_index=0, process_count=1)
  run = [next(full) for _ in range(3)]
  again = next(pipeline.train_iterator(tracklets, config, process_index=0, process_count=1))
  for k in run[0]:
    np.testing.assert_array_equal(run[0][k], again[k])
  resumed = next(pipeline.train_iterator(tracklets, config, start_step=2, process_index=0,
                                         process_count=1))
  for k in run[2]:
    np.testing.assert_array_equal(run[2][k], resumed[k])
  assert not np.array_equal(run[0]["frames"], run[1]["frames"])
  # Augmentation happened: some pixels erased to exactly 0 or flips; the frames differ from
  # the no-augmentation run of the same step.
  plain = next(pipeline.train_iterator(tracklets, _config(flip_prob=0.0, erasing_prob=0.0),
                                       process_index=0, process_count=1))
  np.testing.assert_array_equal(plain["pid"], run[0]["pid"])
  assert not np.allclose(plain["frames"], run[0]["frames"])
  # Two hosts: their local batches concatenate to the single-host global batch.
  halves = [next(pipeline.train_iterator(tracklets, config, start_step=1, process_index=h,
                                         process_count=2)) for h in range(2)]
  for k in run[1]:
    assert halves[0][k].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), run[1][k])


def test_train_errors(tracklets):
  with pytest.raises(ValueError, match="not divisible by the process count 3"):
    pipeline.train_iterator(tracklets, _config(), process_index=0, process_count=3)
  with pytest.raises(ValueError, match="no training tracklets"):
    pipeline.train_iterator((), _config(), process_index=0, process_count=1)
  bad = _config()
  bad.data.source = "lmdb"
  with pytest.raises(ValueError, match="config.data.source"):
    pipeline.train_iterator(tracklets, bad, process_index=0, process_count=1)


def test_steps_per_epoch():
  config = _config()
  assert pipeline.steps_per_epoch(625, synthetic.get_config()) == 78
  assert pipeline.steps_per_epoch(7, config) == 3
  config.optim.steps_per_epoch = 11
  assert pipeline.steps_per_epoch(7, config) == 11


@pytest.mark.parametrize("mode,clips", [("all_frames", "interleaved"), ("rrs", "interleaved")])
def test_eval_iterator_covers_every_clip_once_over_hosts(tracklets, mode, clips):
  config = _config()
  hosts = 2
  seen = []
  for h in range(hosts):
    ev = pipeline.eval_iterator(tracklets, config, sampling=mode, clips=clips,
                                process_index=h, process_count=hosts)
    batches = list(ev)
    assert len(batches) == ev.num_batches
    for b in batches:
      assert b["frames"].shape == (2, 4, H, W, 3) and b["frames"].dtype == np.float32
      assert b["mask"].dtype == np.bool_ and b["tracklet_index"].dtype == np.int32
      for frames, m, t in zip(b["frames"], b["mask"], b["tracklet_index"]):
        if not m:
          assert t == -1 and not frames.any()
          continue
        seen.append(int(t))
    # The batch rows match the plan's clips, frame by frame.
    rows = ev.plan.host_rows(h)
    flat = np.concatenate([b["frames"] for b in batches])
    for r, frames in zip(rows, flat):
      if ev.plan.mask[r]:
        t = int(ev.plan.tracklet[r])
        expect = _expected_frames(t, ev.plan.frames[r])[:, None, None, :]
        np.testing.assert_allclose(frames, np.broadcast_to(expect, frames.shape), atol=1e-5)
  expected = [t for t, tr in enumerate(tracklets)
              for _ in range(len(sampling.tracklet_clips(tr.num_frames, 4, mode, clips)))]
  assert sorted(seen) == expected


def test_eval_defaults_come_from_config(tracklets):
  config = _config()
  config.eval.sampling = "all_frames"
  config.eval.clips = "consecutive"
  ev = pipeline.eval_iterator(tracklets[:3], config, process_index=0, process_count=1)
  # 1 + 1 + 2 consecutive clips of 4 frames -> 4 clips -> one batch of 4.
  assert ev.plan.num_clips == 4 and ev.num_batches == 1
  b = next(iter(ev))
  np.testing.assert_array_equal(b["tracklet_index"], [0, 1, 2, 2])
  assert b["mask"].all()
  again = next(iter(ev))  # re-iterable: a second pass yields the same batch
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])


def test_only_the_sampled_frames_are_read(tmp_path):
  # Frames that RRS-test sampling does not pick are not images at all: reading one would fail.
  config = _config()
  tracks = []
  for t in range(3):
    paths = []
    for j in range(12):  # L=4: chunks of 3, the test picks frames 0, 3, 6, 9
      p = str(tmp_path / f"t{t}_f{j:02d}.png")
      if j % 3 == 0:
        Image.fromarray(np.broadcast_to(_frame_value(t, j), (H, W, 3)).copy()).save(p)
      else:
        with open(p, "wb") as f:
          f.write(b"not an image")
      paths.append(p)
    tracks.append(Tracklet(tuple(paths), t, 0))
  ev = pipeline.eval_iterator(tracks, config, sampling="rrs", process_index=0, process_count=1)
  batch = next(iter(ev))
  np.testing.assert_array_equal(batch["tracklet_index"], [0, 1, 2, -1])
  for t in range(3):
    expect = _expected_frames(t, [0, 3, 6, 9])[:, None, None, :]
    np.testing.assert_allclose(batch["frames"][t], np.broadcast_to(expect, (4, H, W, 3)),
                               atol=1e-5)
  # A corrupt frame that is sampled gives an error naming the problem.
  all_frames = pipeline.eval_iterator(tracks, config, sampling="all_frames",
                                      process_index=0, process_count=1)
  with pytest.raises(DatasetError, match=r"t0_f01\.png: .*not a JPEG/PNG") as info:
    list(all_frames)
  assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)
  assert "in eval tracklet 0 (pid 0, camera 0, 12 frames" in str(info.value)


def test_input_benchmark_runs_and_reports(tmp_path, capsys):
  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top

  summary = input_pipeline.main(["--data=random", "--height=32", "--width=16", "--batches=1",
                                 "--warmup=1", "--threads=1", f"--dir={tmp_path}"])
  (r,) = summary["results"]
  assert r["threads"] == 1 and r["frames_per_batch"] == 8 * 4 * 6
  assert r["frames_per_s"] > 0 and r["frames_per_s_per_thread"] == r["frames_per_s"]
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert '"benchmark": "input_pipeline"' in last
