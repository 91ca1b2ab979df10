"""Index logic: RRS, all-frames clips, P x K batches, eval plans (NumPy; the last test checks
that `pipeline.eval_iterator` passes `config.eval.short_padding` on)."""

import math

import numpy as np
import pytest

from configs import synthetic
from data_pipelines import pipeline
from data_pipelines import sampling
from data_pipelines.tracklets import Tracklet


# ------------------------------------------------------------------ RRS


@pytest.mark.parametrize("n,L", [(12, 6), (13, 6), (20, 6), (1, 6), (4, 6), (6, 6), (7, 3)])
def test_rrs_chunks_pad_with_last_and_split_evenly(n, L):
  chunks = sampling.rrs_chunks(n, L)
  c = math.ceil(n / L)
  assert chunks.shape == (L, c)
  padded = list(range(n)) + [n - 1] * (c * L - n)
  for i in range(L):
    assert chunks[i].tolist() == padded[i * c : (i + 1) * c]


def test_rrs_train_takes_one_frame_from_each_chunk():
  rng = np.random.default_rng(0)
  n, L = 23, 6  # chunks of 4: [0-3] [4-7] ... [20,21,22,22]
  seen = [set() for _ in range(L)]
  for _ in range(300):
    idx = sampling.rrs_train_indices(n, L, rng)
    assert idx.shape == (L,)
    for i, f in enumerate(idx):
      lo = i * 4
      assert lo <= f <= min(lo + 3, n - 1), (i, f)
      seen[i].add(int(f))
  # Every frame of every chunk is reachable (uniform choice inside the chunk).
  assert seen[0] == {0, 1, 2, 3}
  assert seen[5] == {20, 21, 22}


def test_rrs_short_tracklet_pads_with_last_frame():
  rng = np.random.default_rng(1)
  assert sampling.rrs_train_indices(3, 6, rng).tolist() == [0, 1, 2, 2, 2, 2]
  assert sampling.rrs_train_indices(1, 4, rng).tolist() == [0, 0, 0, 0]
  assert sampling.rrs_test_indices(3, 6).tolist() == [0, 1, 2, 2, 2, 2]


def test_rrs_test_is_first_frame_of_each_chunk():
  assert sampling.rrs_test_indices(24, 6).tolist() == [0, 4, 8, 12, 16, 20]
  # n=13: chunks of 3 over 0..12 padded with 12.
  assert sampling.rrs_test_indices(13, 6).tolist() == [0, 3, 6, 9, 12, 12]


def test_rrs_rejects_bad_sizes():
  with pytest.raises(ValueError, match="num_frames"):
    sampling.rrs_chunks(0, 6)
  with pytest.raises(ValueError, match="seq_len"):
    sampling.rrs_chunks(5, 0)


# ------------------------------------------------------------------ all-frames clips


def _interleaved_reference(n, L):
  frames = list(range(n))
  while len(frames) < L:
    frames.append(frames[-1])
  div = len(frames) // L
  return [[frames[j * div + i] for j in range(L)] for i in range(div)]


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 12, 13, 17, 40])
def test_interleaved_clips_match_the_official_rule(n):
  L = 6
  clips = sampling.all_frames_clips(n, L, "interleaved")
  assert clips.tolist() == _interleaved_reference(n, L)
  div = max(n, L) // L
  assert clips.shape == (div, L)
  # The clips cover exactly the first L*div frames, each once (when n >= L).
  if n >= L:
    assert sorted(clips.reshape(-1).tolist()) == list(range(L * div))


def _official_pad(n, L):
  imgs = list(range(n))
  while len(imgs) < L:
    imgs = imgs + imgs[-2:-1]
  return imgs


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_interleaved_official_padding_repeats_second_to_last(n):
  assert sampling.all_frames_clips(n, 6, pad="official").tolist() == [_official_pad(n, 6)]
  assert sampling.all_frames_clips(3, 6, pad="official").tolist() == [[0, 1, 2, 1, 2, 1]]
  # n=1 loops forever in the official code; here it repeats the only frame.
  assert sampling.all_frames_clips(1, 6, pad="official").tolist() == [[0] * 6]


@pytest.mark.parametrize("n", [1, 3, 6, 7, 12, 14])
def test_consecutive_clips(n):
  L = 6
  clips = sampling.all_frames_clips(n, L, "consecutive")
  assert clips.shape == (math.ceil(n / L), L)
  flat = clips.reshape(-1).tolist()
  assert flat[:n] == list(range(n))
  assert flat[n:] == [n - 1] * (len(flat) - n)


def test_unknown_clip_mode():
  with pytest.raises(ValueError, match="clip mode"):
    sampling.all_frames_clips(10, 6, "strided")


# ------------------------------------------------------------------ P x K


def _toy_index(num_ids=10, per_id=(1, 2, 3, 5), cams=3, seed=0):
  rng = np.random.default_rng(seed)
  pids, camids = [], []
  for pid in range(num_ids):
    k = per_id[pid % len(per_id)]
    pids += [pid] * k
    camids += rng.integers(0, cams, size=k).tolist()
  return np.asarray(pids), np.asarray(camids)


def _kw(**over):
  kw = dict(seed=3, num_ids_per_batch=4, num_tracklets_per_id=3, steps_per_epoch=2)
  kw.update(over)
  return kw


def test_pk_batch_has_P_distinct_ids_with_K_tracklets_each():
  pids, camids = _toy_index()
  index = sampling.IdentityIndex.build(pids, camids)
  for step in range(6):
    t = sampling.pk_batch(index, step, **_kw())
    assert t.shape == (12,)
    ids = pids[t].reshape(4, 3)
    # K rows per identity, P distinct identities.
    assert (ids == ids[:, :1]).all()
    assert len(set(ids[:, 0].tolist())) == 4


def test_epoch_visits_each_identity_at_most_once_and_covers_floor_C_over_P_groups():
  pids, camids = _toy_index(num_ids=13)
  index = sampling.IdentityIndex.build(pids, camids)
  spe = sampling.num_groups(13, 4)
  assert spe == 3
  for epoch in range(3):
    batches = [sampling.pk_batch(index, epoch * spe + s, **_kw(steps_per_epoch=spe))
               for s in range(spe)]
    ids = np.concatenate([np.unique(pids[b]) for b in batches])
    assert len(ids) == 12 and len(set(ids.tolist())) == 12  # 13 ids, drop-last leaves one out
  # Different epochs use different identity orders.
  g0 = sampling.epoch_identity_groups(index, seed=3, epoch=0, num_ids_per_batch=4,
                                      steps_per_epoch=spe)
  g1 = sampling.epoch_identity_groups(index, seed=3, epoch=1, num_ids_per_batch=4,
                                      steps_per_epoch=spe)
  assert not np.array_equal(g0, g1)


def test_epoch_with_exactly_C_over_P_covers_every_identity():
  pids, camids = _toy_index(num_ids=12)
  index = sampling.IdentityIndex.build(pids, camids)
  g = sampling.epoch_identity_groups(index, seed=0, epoch=5, num_ids_per_batch=4,
                                     steps_per_epoch=3)
  assert sorted(g.reshape(-1).tolist()) == list(range(12))


def test_longer_configured_epoch_continues_with_new_permutations():
  pids, camids = _toy_index(num_ids=8)
  index = sampling.IdentityIndex.build(pids, camids)
  g = sampling.epoch_identity_groups(index, seed=0, epoch=0, num_ids_per_batch=4,
                                     steps_per_epoch=5)
  assert g.shape == (5, 4)
  assert sorted(g[:2].reshape(-1).tolist()) == list(range(8))
  assert sorted(g[2:4].reshape(-1).tolist()) == list(range(8))


def test_pk_is_a_pure_function_of_seed_and_step():
  pids, camids = _toy_index()
  index = sampling.IdentityIndex.build(pids, camids)
  nf = np.arange(1, len(pids) + 1) * 3
  run = [sampling.train_batch(index, nf, s, seq_len=6, **_kw()) for s in range(7)]
  # Resume at step 4: the same batches from there on, computed in another order.
  resumed = [sampling.train_batch(index, nf, s, seq_len=6, **_kw()) for s in (6, 5, 4)][::-1]
  for a, b in zip(run[4:], resumed):
    np.testing.assert_array_equal(a.tracklets, b.tracklets)
    np.testing.assert_array_equal(a.frames, b.frames)
  other_seed = sampling.train_batch(index, nf, 4, seq_len=6, **_kw(seed=4))
  assert not np.array_equal(other_seed.tracklets, run[4].tracklets)
  # Frames are RRS frames of the chosen tracklets.
  for plan in run:
    for t, f in zip(plan.tracklets, plan.frames):
      chunks = sampling.rrs_chunks(int(nf[t]), 6)
      assert all(f[i] in chunks[i] for i in range(6))


def test_draws_are_with_replacement_and_uniform_over_the_identity():
  pids = np.asarray([0] * 3 + [1] * 3)
  index = sampling.IdentityIndex.build(pids, np.zeros(6, int))
  counts = np.zeros(6)
  repeats = 0
  for step in range(400):
    t = sampling.pk_batch(index, step, seed=0, num_ids_per_batch=2, num_tracklets_per_id=4,
                          steps_per_epoch=1)
    counts += np.bincount(t, minlength=6)
    repeats += len(np.unique(t[:4])) < 4  # 4 draws of 3 tracklets always repeat one
  assert repeats == 400
  np.testing.assert_allclose(counts / counts.sum(), np.full(6, 1 / 6), atol=0.02)


def test_prefer_cross_camera_takes_distinct_cameras_first():
  # Identity 0: 5 tracklets in camera 0, 1 in camera 1, 1 in camera 2.
  pids = np.asarray([0] * 7 + [1] * 2)
  camids = np.asarray([0, 0, 0, 0, 0, 1, 2, 0, 1])
  index = sampling.IdentityIndex.build(pids, camids)
  for step in range(50):
    t = sampling.pk_batch(index, step, seed=1, num_ids_per_batch=2, num_tracklets_per_id=4,
                          steps_per_epoch=1, prefer_cross_camera=True)
    for k in range(2):
      rows = t[k * 4 : (k + 1) * 4]
      cams = camids[rows]
      ncam = len(np.unique(camids[pids == pids[rows[0]]]))
      assert len(set(cams[:ncam].tolist())) == ncam
  # Without the option, 4 draws for identity 0 often stay in camera 0.
  same = 0
  for step in range(50):
    t = sampling.pk_batch(index, step, seed=1, num_ids_per_batch=2, num_tracklets_per_id=4,
                          steps_per_epoch=1)
    rows = t[:4] if pids[t[0]] == 0 else t[4:]
    same += len(set(camids[rows[:3]].tolist())) < 3
  assert same > 25


def test_too_few_identities_is_an_error():
  index = sampling.IdentityIndex.build([0, 1, 2], [0, 0, 0])
  with pytest.raises(ValueError, match="at least P=4"):
    sampling.pk_batch(index, 0, seed=0, num_ids_per_batch=4, num_tracklets_per_id=2,
                      steps_per_epoch=1)


# ------------------------------------------------------------------ eval plans


@pytest.mark.parametrize("sampling_mode,clips", [("rrs", "interleaved"),
                                                 ("all_frames", "interleaved"),
                                                 ("all_frames", "consecutive")])
@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_eval_plan_pads_masks_and_covers_every_clip_once_over_hosts(sampling_mode, clips, hosts):
  num_frames = [1, 5, 6, 13, 40, 7, 2, 25, 11]
  L, G = 6, 8
  plan = sampling.eval_plan(num_frames, seq_len=L, sampling=sampling_mode, clips=clips,
                            global_batch=G, process_count=hosts)
  expected = [sampling.tracklet_clips(n, L, sampling_mode, clips) for n in num_frames]
  n_clips = sum(len(e) for e in expected)
  assert plan.num_clips == n_clips
  assert plan.num_batches == math.ceil(n_clips / G)
  assert plan.mask.sum() == n_clips and len(plan.mask) == plan.num_batches * G
  assert (plan.tracklet[~plan.mask] == -1).all()

  seen = []
  for h in range(hosts):
    rows = plan.host_rows(h)
    assert len(rows) == plan.num_batches * (G // hosts)  # same number of batches per host
    seen.append(rows)
  allrows = np.concatenate(seen)
  assert sorted(allrows.tolist()) == list(range(len(plan.mask)))  # exactly once overall
  # Row content: tracklet t's clips, in order.
  got = {}
  for r in np.flatnonzero(plan.mask):
    got.setdefault(int(plan.tracklet[r]), []).append(plan.frames[r].tolist())
  assert got == {t: e.tolist() for t, e in enumerate(expected)}


def test_eval_plan_host_rows_form_the_global_batch_in_host_order():
  plan = sampling.eval_plan([10] * 5, seq_len=2, sampling="all_frames", global_batch=4,
                            process_count=2)
  # Batch b of host h is rows [4b + 2h, 4b + 2h + 2).
  assert plan.host_rows(0).tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25]
  assert plan.host_rows(1).tolist() == [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27]


def test_eval_plan_errors():
  with pytest.raises(ValueError, match="not divisible by the process count"):
    sampling.eval_plan([5], seq_len=2, sampling="rrs", global_batch=6, process_count=4)
  with pytest.raises(ValueError, match="eval sampling"):
    sampling.eval_plan([5], seq_len=2, sampling="dense", global_batch=4)
  empty = sampling.eval_plan([], seq_len=2, sampling="rrs", global_batch=4)
  assert empty.num_batches == 0


@pytest.mark.parametrize("sampling_mode", ["all_frames", "rrs"])
def test_eval_plan_short_padding(sampling_mode):
  """`pad` (config.eval.short_padding) reaches the interleaved all-frames clips of a short
  tracklet: "official" 0 1 2 1 2 1 for 3 frames and L = 6, "last" (default) 0 1 2 2 2 2;
  tracklets of L frames or more and RRS clips do not depend on it."""
  num_frames = [3, 8, 1]
  plans = {pad: sampling.eval_plan(num_frames, seq_len=6, sampling=sampling_mode, pad=pad,
                                   global_batch=4)
           for pad in sampling.SHORT_PADDINGS}
  default = sampling.eval_plan(num_frames, seq_len=6, sampling=sampling_mode, global_batch=4)
  np.testing.assert_array_equal(default.frames, plans["last"].frames)
  if sampling_mode == "all_frames":
    assert plans["official"].frames[0].tolist() == [0, 1, 2, 1, 2, 1]
    assert plans["last"].frames[0].tolist() == [0, 1, 2, 2, 2, 2]
    np.testing.assert_array_equal(plans["official"].frames[1:], plans["last"].frames[1:])
  else:
    np.testing.assert_array_equal(plans["official"].frames, plans["last"].frames)
  with pytest.raises(ValueError, match="padding"):
    sampling.eval_plan(num_frames, seq_len=6, sampling=sampling_mode, pad="first", global_batch=4)


def test_config_short_padding_reaches_eval_iterator(tmp_path):
  """`config.eval.short_padding` is what `pipeline.eval_iterator` passes to `eval_plan` (the
  plan is built before any frame is read)."""
  tracks = [Tracklet(tuple(str(tmp_path / f"t{t}_f{j}.png") for j in range(n)), t, 0)
            for t, n in enumerate([3, 7])]
  config = synthetic.get_config("smoke")
  config.data.seq_len = 6
  config.data.eval_batch_size = 4
  config.eval.sampling = "all_frames"
  config.eval.clips = "interleaved"
  assert config.eval.short_padding == "last"  # the default
  first = {}
  for pad in sampling.SHORT_PADDINGS:
    config.eval.short_padding = pad
    ev = pipeline.eval_iterator(tracks, config, process_index=0, process_count=1)
    first[pad] = ev.plan.frames[0].tolist()
  assert first == {"last": [0, 1, 2, 2, 2, 2], "official": [0, 1, 2, 1, 2, 1]}
