"""config.eval.sampling = "whole": STA's masked, chunked one-pass embedding in the engine."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import synthetic
from data_pipelines import pipeline
from data_pipelines.tracklets import Tracklet
from stmn_jax import app, checkpoints, embedding, evaluators, features_io, inference, ranking
from stmn_jax import run_setup, sharding
from stmn_jax import train_state
from stmn_jax.models import sta

H, W, CHUNK = 64, 32, 4
LENGTHS = (1, 3, 9, 4)  # one frame, < chunk, > chunk (spans two eval batches), == chunk


def _rand(*shape, seed=0, positive=False):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return np.abs(x) if positive else x


# ------------------------------------------------------------------ pure pieces


def test_masked_fuse_ignores_padding():
  v, s = _rand(2, 5, 4, 6, seed=1), _rand(2, 5, 4, seed=2, positive=True)
  n = 3
  mask = np.arange(5)[None, :] < np.asarray([[n], [n]])
  s_pad = s.copy()
  s_pad[:, n:] = 50.0  # padding frames with huge scores must not win the arg-max
  att = sta.frame_attention(jnp.asarray(s_pad), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(att)[:, n:], 0.0)
  got = sta.fuse(jnp.asarray(v), att, jnp.asarray(mask))
  want = sta.fuse(jnp.asarray(v[:, :n]), sta.frame_attention(jnp.asarray(s[:, :n])))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits", [(1,), (2, 3), (1, 1, 1, 2, 2), (4, 3)])
def test_merged_chunk_summaries_equal_one_pass_fuse(splits):
  t = sum(splits)
  v, s = _rand(1, t, 3, 5, seed=t), _rand(1, t, 3, seed=t + 1, positive=True)
  s[0, -1, 0] = s[0, 0, 0] = s[0, :, 0].max() + 1.0  # tie across chunks: the first frame wins
  want = np.asarray(sta.fuse(jnp.asarray(v), sta.frame_attention(jnp.asarray(s))))
  chunk = max(splits)
  summary, start = None, 0
  for n in splits:  # every chunk padded to `chunk` frames with garbage + mask
    vc = np.full((1, chunk, 3, 5), 7.0, np.float32)
    sc = np.full((1, chunk, 3), 9.0, np.float32)
    vc[:, :n], sc[:, :n] = v[:, start:start + n], s[:, start:start + n]
    part = sta.summarize(jnp.asarray(vc), jnp.asarray(sc), jnp.asarray(np.arange(chunk) < n)[None])
    part = sta.StripeSummary(*(np.asarray(a) for a in part))
    summary = part if summary is None else sta.merge_summaries(summary, part, xp=np)
    start += n
  np.testing.assert_allclose(sta.fuse_summary(summary, xp=np), want, rtol=1e-5, atol=1e-6)
  # f1 of stripe 0 is frame 0's vector (first arg-max), not the last frame's
  np.testing.assert_array_equal(summary.best_vector[0, 0], v[0, 0, 0])


# ------------------------------------------------------------------ engine


def _config(model="sta", flip=False):
  config = synthetic.get_config(f"{model},smoke")
  config.data.seq_len = CHUNK
  config.data.eval_batch_size = 4  # 4 rows of CHUNK frames per batch on the 4 test devices
  config.eval.flip = flip
  config.eval.sampling = "whole"
  if model == "sta":
    config.model.sta.eval_chunk = CHUNK
  return config


def _tracklets(tmp_path):
  rng = np.random.default_rng(0)
  out = []
  for i, n in enumerate(LENGTHS):
    paths = []
    for j in range(n):
      path = tmp_path / f"t{i}_f{j}.png"
      Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
      paths.append(str(path))
    out.append(Tracklet(frames=tuple(paths), pid=i // 2, camid=i % 2))  # pairs, two cameras
  return out


def _frames(tracklets, config):
  """Each tracklet's pipeline-decoded, normalised frames (T, H, W, 3), read as one clip."""
  longest = max(t.num_frames for t in tracklets)
  sub = config.copy_and_resolve_references()
  sub.data.seq_len = longest
  sub.data.eval_batch_size = 4
  rows = [b for batch in pipeline.eval_iterator(tracklets, sub, sampling="all_frames",
                                                clips="consecutive")
          for b in zip(batch["frames"], batch["tracklet_index"])]
  return [np.asarray(f)[:tracklets[i].num_frames] for f, i in rows if i >= 0]


@pytest.fixture(scope="module")
def sta_state():
  mesh = sharding.make_mesh()
  state, _ = train_state.create_train_state(_config(), 5, 1, mesh)
  return state, mesh


@pytest.mark.parametrize("flip", [False, True])
def test_whole_tracklet_features_equal_one_pass(sta_state, tmp_path, flip):
  state, mesh = sta_state
  config = _config(flip=flip)
  tracklets = _tracklets(tmp_path)
  fns = embedding.make_whole_tracklet_fns(state, config, mesh)
  assert (fns.chunk, fns.rows) == (CHUNK, 4)
  feats = inference.whole_tracklet_features(state, fns, tracklets, config, mesh)
  assert feats.shape == (len(LENGTHS), config.model.sta.embed_dim)
  model = state.model()  # eval mode
  one_pass = nnx.jit(lambda m, x: m.head(sta.fuse(*_vs(m, x))))
  for i, frames in enumerate(_frames(tracklets, config)):
    assert frames.shape[0] == LENGTHS[i]
    views = [frames, frames[:, :, ::-1]] if flip else [frames]
    direct = np.mean([one_pass(model, jnp.asarray(x))[0] for x in views], axis=0)
    chunked = np.mean([model.embed_all_frames(x, chunk=CHUNK) for x in views], axis=0)
    np.testing.assert_allclose(feats[i], direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats[i], chunked, rtol=1e-4, atol=1e-5)
  # One compiled program per function, whatever the tracklet lengths.
  assert fns.summarize._cache_size() == 1 and fns.embed._cache_size() == 1


def _vs(model, frames):
  v, s, _ = model.frame_stripes(frames)
  k = model.num_stripes
  return v.reshape(1, frames.shape[0], k, -1), sta.frame_attention(s.reshape(1, -1, k))


def test_evaluate_tracklets_whole_ranks_the_features(sta_state, tmp_path):
  state, mesh = sta_state
  config = _config()
  tracklets = _tracklets(tmp_path)
  query, gallery = tracklets[:2], tracklets
  res = evaluators.from_config(state, config, mesh).run(state, query, gallery)
  feats = inference.whole_tracklet_features(
      state, embedding.make_whole_tracklet_fns(state, config, mesh), tracklets, config, mesh)
  q = np.asarray([t.pid for t in query])
  g = np.asarray([t.pid for t in gallery])
  qc, gc = np.asarray([t.camid for t in query]), np.asarray([t.camid for t in gallery])
  want = ranking.evaluate(feats[:2], feats, q, g, qc, gc, distance=config.eval.distance,
                             rerank=False, ap=config.eval.ap, max_rank=config.eval.max_rank)
  np.testing.assert_allclose(res["mAP"], want["mAP"])
  np.testing.assert_allclose(res["cmc"], want["cmc"])


def test_whole_sampling_needs_a_whole_tracklet_model():
  mesh = sharding.make_mesh()
  config = _config("baseline")
  state, _ = train_state.create_train_state(config, 5, 1, mesh)
  with pytest.raises(ValueError, match=r"sampling='whole'.*'stmn'.*STMN"):
    embedding.make_whole_tracklet_fns(state, config, mesh)
  with pytest.raises(ValueError, match="STMN"):
    evaluators.from_config(state, config, mesh)


def test_unknown_sampling_is_named():
  config = _config()
  config.eval.sampling = "everything"
  with pytest.raises(ValueError, match="config.eval.sampling.*everything"):
    run_setup.check_config(config)


# ------------------------------------------------------------------ the modes, with STA + "whole"


@pytest.fixture(scope="module")
def sta_workdir(tmp_path_factory):
  """An STA workdir (random weights, one checkpoint) on the smoke synthetic data, "whole"."""
  tmp = tmp_path_factory.mktemp("sta_whole")
  config = _config()
  config.dataset.root = str(tmp / "data")
  setup = run_setup.prepare_run(config)
  state, _ = train_state.create_train_state(config, setup.num_classes, 1, setup.mesh)
  workdir = str(tmp / "work")
  with checkpoints.Checkpointer(workdir) as ckpt:
    ckpt.save(1, state.checkpoint_tree())
    ckpt.wait()
  fns = embedding.make_whole_tracklet_fns(state, config, setup.mesh)
  return config, state, setup, workdir, fns, tmp


def test_extract_mode_embeds_whole_tracklets(sta_workdir):
  config, state, setup, workdir, fns, _ = sta_workdir
  gallery = list(setup.test_split.gallery)
  summary = app.run(config, workdir, "extract", split="gallery")
  feats, rows = features_io.read_features(summary["embeddings"])
  want = inference.whole_tracklet_features(state, fns, gallery, config, setup.mesh)
  np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)
  assert [r["num_frames"] for r in rows] == [t.num_frames for t in gallery]
  # The clip average is another embedding: the mode did not fall back to clips.
  clips = config.copy_and_resolve_references()
  clips.eval.sampling = "all_frames"
  other = inference.embed_tracklets(state, gallery[:4], clips, setup.mesh)
  assert np.abs(other - want[:4]).max() > 1e-4


def test_search_mode_ranks_whole_tracklet_queries(sta_workdir):
  config, state, setup, workdir, fns, tmp = sta_workdir
  gallery = app.run(config, workdir, "extract", split="gallery")
  query_dir = tmp / "queries"
  picks = list(setup.test_split.query)[:2]
  for i, t in enumerate(picks):
    (query_dir / f"q{i}").mkdir(parents=True)
    for j, frame in enumerate(t.frames):  # the same bytes: decoded as the gallery's were
      shutil.copy(frame, query_dir / f"q{i}" / f"{j:04d}{os.path.splitext(frame)[1]}")
  summary = app.run(config, workdir, "search", query=str(query_dir),
                    gallery=gallery["embeddings"], topk=3)
  g_feats, _ = features_io.read_features(gallery["embeddings"])
  q_feats = inference.whole_tracklet_features(state, fns, picks, config, setup.mesh)
  dist = np.asarray(ranking.pairwise_distance(q_feats, g_feats, config.eval.distance))
  for qi, result in enumerate(summary["results"]):
    got = [m["distance"] for m in result["matches"]]
    np.testing.assert_allclose(got, np.sort(dist[qi])[:3], rtol=1e-4, atol=1e-5)


def test_visualize_mode_ranks_whole_tracklets(sta_workdir):
  config, state, setup, workdir, fns, _ = sta_workdir
  summary = app.run(config, workdir, "visualize", topk=2)
  assert os.path.isfile(summary["figures"]["ranked_lists"])
  with open(summary["json"]) as f:
    ranked = json.load(f)["ranking"]["queries"]
  query, gallery = list(setup.test_split.query), list(setup.test_split.gallery)
  unique = list(dict.fromkeys(query + gallery))
  feats = inference.whole_tracklet_features(state, fns, unique, config, setup.mesh)
  q0 = ranked[0]
  g_feats = feats[[unique.index(t) for t in gallery]]
  dist = np.asarray(ranking.pairwise_distance(feats[[unique.index(query[q0["query"]])]],
                                              g_feats, config.eval.distance))[0]
  for m in q0["matches"]:
    np.testing.assert_allclose(m["distance"], dist[m["gallery"]], rtol=1e-4, atol=1e-5)
