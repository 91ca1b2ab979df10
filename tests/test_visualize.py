"""--mode=visualize on a 2-step smoke STMN: PNGs, visrank layout, memory probabilities, weights."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from data_pipelines import sampling
from stmn_jax import app
from stmn_jax import sharding
from stmn_jax import train
from stmn_jax import visualize
from stmn_jax import figures
from stmn_jax import run_setup
from stmn_jax.models import memory
from tests.test_export import _perturbed_state, _save

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(root):
  """Smoke STMN; one clip per tracklet, no flip at test time (fewer, smaller compiles)."""
  config = synthetic.get_config("stmn,smoke")
  config.dataset.root = str(root)
  config.dataset.num_val_ids = 0
  config.train.select_on = "none"
  config.optim.num_epochs = 1
  config.optim.steps_per_epoch = 2
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 1
  config.eval.sampling = "rrs"
  config.eval.flip = False
  config.visualize.memory_tracklets = 6
  config.visualize.num_tracklets = 2
  config.visualize.num_queries = 3
  config.visualize.topk = 5
  config.visualize.visrank_queries = -1
  return config


@pytest.fixture(scope="module")
def visualized(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vis")
  config = _config(tmp / "data")
  workdir = str(tmp / "stmn")
  # One train step of two: a checkpoint and TensorBoard scalars, no evaluation compiled.
  # The returned state is the one the step-1 checkpoint holds.
  state, trained = train.train_and_evaluate(config, workdir, max_steps=1)
  # A second model of the same architecture for --compare_workdir: other parameters, no training.
  mesh = sharding.make_mesh()
  compare = str(tmp / "other")
  other = _perturbed_state(config, mesh, 5)
  _save(other, compare, 1)
  summary = app.run(config, workdir, "visualize", compare_workdir=compare)
  with open(summary["json"]) as f:
    numbers = json.load(f)
  _, _, test_split, _ = run_setup.load_data(config)
  return config, workdir, summary, numbers, state, other, test_split, mesh, trained


def _frames(tracklet, idx, config):
  """Normalised float32 (n, H, W, 3) frames, decoded by TensorFlow as the input pipeline does
  (its JPEG decoder differs from PIL's by a grey level here and there); the smoke frames are
  already at the model's size, so there is no resize."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  x = np.stack([tf.io.decode_image(tf.io.read_file(tracklet.frames[i]), channels=3).numpy()
                for i in idx]).astype(np.float32) / 255.0
  assert x.shape[1:3] == (config.data.height, config.data.width)
  return (x - np.asarray(config.data.mean, np.float32)) / np.asarray(config.data.std, np.float32)


def test_every_figure_is_a_valid_png(visualized):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  _, workdir, summary, numbers, *_ = visualized
  out = os.path.join(workdir, "visualize")
  expected = {"memory_probs", "norm_change", "temporal_weights", "ranked_lists", "curves"}
  assert set(summary["figures"]) == expected
  pngs = [os.path.join(out, f"{name}.png") for name in expected] + numbers["ranking"][
      "ranked_pngs"]
  assert len(pngs) == len(expected) + 3
  for path in pngs:
    assert path in summary["figures"].values() or os.path.dirname(path).endswith("ranked")
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE, path
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      assert im.format == "PNG" and im.width >= 150 and im.height >= 100, (path, im.size)
      pixels = np.asarray(im.convert("RGB"))
      assert pixels.std() > 10, path  # not a blank canvas


def _rrs(tracklet, config):
  """The tracklet's one RRS test clip (frame indices), as `config.eval.sampling = "rrs"`."""
  return tuple(int(i) for i in sampling.rrs_test_indices(tracklet.num_frames,
                                                         config.data.seq_len))


def _cosine(q, g):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  g = g / np.linalg.norm(g, axis=1, keepdims=True)
  return 1.0 - q @ g.T


def test_visrank_folders_follow_a_direct_ranking(visualized, direct):
  config, workdir, _, numbers, _, _, test_split, _, _ = visualized
  index, out = direct
  query, gallery = list(test_split.query), list(test_split.gallery)
  # Embeddings of the eval-mode model on each tracklet's RRS test clip (config: rrs, no flip).
  q, g = ([out["model"]["embedding"][index[(t, _rrs(t, config))]] for t in part]
          for part in (query, gallery))
  dist = _cosine(np.asarray(q), np.asarray(g))
  root = os.path.join(workdir, "visualize", "visrank")
  assert numbers["ranking"]["visrank_queries"] == len(query)
  assert sorted(os.listdir(root)) == sorted(
      os.path.splitext(os.path.basename(t.frames[0]))[0] for t in query)
  k = config.visualize.topk
  for qi, t in enumerate(query):
    qdir = os.path.join(root, os.path.splitext(os.path.basename(t.frames[0]))[0])
    # Brute force: every gallery tracklet but the query's own pid + camera, by distance.
    valid = [gi for gi, x in enumerate(gallery) if not (x.pid == t.pid and x.camid == t.camid)]
    want = sorted(valid, key=lambda gi: dist[qi, gi])[:k]
    folders = sorted(os.listdir(qdir))
    assert folders[-1] == "query_top000"
    assert sorted(os.listdir(os.path.join(qdir, "query_top000"))) == sorted(
        os.path.basename(f) for f in t.frames)
    got = folders[:-1]
    assert [f[:len("gallery_top000")] for f in got] == [
        f"gallery_top{r:03d}" for r in range(1, len(want) + 1)]
    for r, (folder, gi) in enumerate(zip(got, want), 1):
      files = sorted(os.listdir(os.path.join(qdir, folder)))
      match = [j for j in valid if sorted(os.path.basename(f) for f in gallery[j].frames) == files]
      assert len(match) == 1, (folder, files)
      j = match[0]
      # Same rank position up to float ties: the distance at this rank is the brute-force one.
      np.testing.assert_allclose(dist[qi, j], dist[qi, gi], atol=1e-5)
      assert folder.endswith("_TRUE" if gallery[j].pid == t.pid else "_FALSE"), folder


def _direct(model, x, config):
  """Direct computations on clips x (B, L, H, W, 3): spatial matching probabilities by
  trunk -> spatial-query stage -> rows -> SpatialMemory.address, (B, L, h*w, M); temporal ones
  by pooled temporal queries -> LSTM -> cosine logits vs the keys -> softmax, (B, N); and the
  model's own frame weights (B, L) and embeddings (B, D)."""
  b, length = x.shape[:2]
  shared = model.trunk(x.reshape(b * length, *x.shape[2:]))
  rows = memory.to_query_rows(model.spatial_query_stage(shared), config.model.smem_layout)
  spatial = model.spatial_memory.address(rows)  # (B * L, h*w, M)
  tq = jnp.mean(model.temporal_query_stage(shared), axis=(1, 2)).reshape(b, length, -1)
  logits = memory.memory_logits(model.temporal_memory.encode(tq),
                                model.temporal_memory.mem_keys[...],
                                config.model.memory_similarity)
  out = model(x)
  return {"spatial": spatial.reshape(b, length, *spatial.shape[1:]),
          "temporal": jax.nn.softmax(logits, axis=-1), "weights": out["frame_weights"],
          "embedding": out["embedding"]}


@pytest.fixture(scope="module")
def direct(visualized):
  """`_direct` of both models on every clip the JSON records (one batch: one set of shapes)."""
  config, _, _, numbers, state, other, test_split, _, _ = visualized
  tracklets = list(test_split.gallery)  # the default --split
  keys = [(tracklets[e["tracklet"]], tuple(e["frames"]))
          for e in numbers["memory"]["model"]["temporal"]["rows"]]
  for entry in numbers["temporal_weights"]["tracklets"]:
    keys += [(tracklets[entry["tracklet"]], tuple(clip)) for clip in entry["clips"]]
  keys += [(t, _rrs(t, config)) for t in list(test_split.query) + tracklets]
  index = {}
  for k in keys:
    index.setdefault(k, len(index))
  x = np.stack([_frames(t, clip, config) for t, clip in index])
  graph = state.model_def_eval  # both models: one graph, compiled once
  fn = jax.jit(lambda model_state, x: _direct(nnx.merge(graph, model_state), x, config))
  return index, {name: jax.device_get(fn(jax.device_get(st.model_state), x))
                 for name, st in (("model", state), ("compare", other))}


def test_memory_probabilities_match_direct_calls(visualized, direct):
  config, _, _, numbers, *_ = visualized
  tracklets = list(visualized[6].gallery)  # the default --split
  index, out = direct
  mem = numbers["memory"]
  assert set(mem) == {"model", "compare"}
  for name in ("model", "compare"):
    spatial, temporal = mem[name]["spatial"]["rows"], mem[name]["temporal"]["rows"]
    assert len(spatial) == len(temporal) == config.visualize.memory_tracklets
    probs = np.asarray([r["probs"] for r in spatial])
    assert probs.shape == (len(spatial), config.model.spatial_slots)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    want = [out[name]["spatial"][index[(tracklets[r["tracklet"]], tuple(r["frames"]))],
                                 r["frame"], r["location"]] for r in spatial]
    np.testing.assert_allclose(probs, want, atol=2e-5)
    tprobs = np.asarray([r["probs"] for r in temporal])
    assert tprobs.shape == (len(temporal), config.model.temporal_slots)
    np.testing.assert_allclose(tprobs.sum(axis=1), 1.0, atol=1e-5)
    want = [out[name]["temporal"][index[(tracklets[r["tracklet"]], tuple(r["frames"]))]]
            for r in temporal]
    np.testing.assert_allclose(tprobs, want, atol=2e-5)
    # Both models were fed the same clips, frames and locations.
    other_rows = mem["compare" if name == "model" else "model"]["spatial"]["rows"]
    assert [(r["tracklet"], r["frames"], r["frame"], r["location"]) for r in spatial] == [
        (r["tracklet"], r["frames"], r["frame"], r["location"]) for r in other_rows]
    stats = mem[name]["spatial"]["stats_sampled"]
    np.testing.assert_allclose(stats["usage"], probs.mean(axis=0), atol=1e-6)
    ent = -np.sum(probs * np.log(probs), axis=1).mean()
    np.testing.assert_allclose(stats["mean_entropy"], ent, rtol=1e-5)
  assert not np.allclose(mem["model"]["spatial"]["rows"][0]["probs"],
                         mem["compare"]["spatial"]["rows"][0]["probs"])


def test_temporal_weights_equal_the_model_output(visualized, direct):
  config, _, _, numbers, *_ = visualized
  tracklets = list(visualized[6].gallery)
  index, out = direct
  tw = numbers["temporal_weights"]
  assert tw["tracklets"], "no tracklet picked for the temporal-weights figure"
  for entry in tw["tracklets"]:
    assert entry["kind"] in visualize.WEIGHT_KINDS
    assert entry["clips"][0] == list(range(config.data.seq_len))  # consecutive clips
    t = tracklets[entry["tracklet"]]
    want = [out["model"]["weights"][index[(t, tuple(c))]] for c in entry["clips"]]
    np.testing.assert_allclose(entry["weights"], want, atol=2e-5)
    np.testing.assert_allclose(np.sum(entry["weights"], axis=1), 1.0, atol=1e-5)
  any_kind = tw["distractor_vs_clean"]["any"]
  assert any_kind["uniform"] == pytest.approx(1.0 / config.data.seq_len)


def test_distractor_weight_stats_by_hand():
  meta = [
      {"occluded": [1, 0, 0, 0, 0], "misaligned": [0, 0, 0, 0, 1], "out_of_frame": [0] * 5,
       "other_person": [0] * 5},
      None,  # not in the sidecar: ignored
      {"occluded": [1, 1], "misaligned": [0, 0], "out_of_frame": [0, 0],
       "other_person": [0, 0]},
  ]
  weights = np.asarray([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.5, 0.5, 0.0, 0.0],
                        [0.25, 0.25, 0.25, 0.25]])
  frames = np.asarray([[0, 1, 2, 3], [4, 4, 4, 4], [0, 1, 1, 1], [0, 1, 2, 3]])
  tracklet = np.asarray([0, 0, 2, 1])
  stats = visualize.distractor_weight_stats(weights, frames, tracklet, meta)
  # Clip 0 mixes occluded frame 0 (0.1) with clean frames 1..3; clip 1 is frame 4 alone
  # (misaligned, no clean frame); clip 2 is all occluded; clip 3 has no sidecar entry.
  occ = stats["occluded"]
  assert (occ["clips"], occ["flagged_frames"], occ["clean_frames"]) == (1, 1, 3)
  assert occ["mean_weight_flagged"] == pytest.approx(0.1)
  assert occ["mean_weight_clean"] == pytest.approx(0.3)
  assert stats["misaligned"]["clips"] == 0 and stats["misaligned"]["mean_weight_flagged"] is None
  assert stats["any"]["clips"] == 1 and stats["any"]["mean_weight_flagged"] == pytest.approx(0.1)
  assert stats["any"]["uniform"] == pytest.approx(0.25)
  np.testing.assert_array_equal(visualize.real_positions([4, 4, 7, 4]), [1, 0, 1, 0])


def test_scalars_read_from_the_event_files(visualized, tmp_path):
  workdir, trained = visualized[1], visualized[-1]
  scalars = visualize.read_scalars(workdir)
  steps, values = scalars["train_loss"]
  want = np.asarray(trained["loss_history"])  # (step, loss) of every logged step
  assert len(want) == 1
  np.testing.assert_array_equal(steps, want[:, 0])
  np.testing.assert_allclose(values, want[:, 1], rtol=1e-6)
  np.testing.assert_allclose(scalars["train_spread_spatial"][1],
                             [trained["train"]["spread_spatial"]], rtol=1e-6)
  assert "train_spread_spatial" in figures.loss_tags(scalars)
  assert "train_lr" not in figures.loss_tags(scalars)
  # Old-style `simple_value` scalars are read too.
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top

  writer = event_file_writer.EventFileWriter(str(tmp_path))
  for step, x in ((3, 0.5), (1, 0.25), (3, 0.75)):
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="val_mAP",
                                                                   simple_value=x)])
    writer.add_event(event_pb2.Event(step=step, summary=summary))
  writer.close()
  steps, values = visualize.read_scalars(str(tmp_path))["val_mAP"]
  np.testing.assert_array_equal(steps, [1, 3])
  np.testing.assert_allclose(values, [0.25, 0.75])  # a repeated step keeps the last value


def test_workdir_without_checkpoint_is_a_clear_error(tmp_path):
  config = _config(tmp_path / "data")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape(f"--workdir={empty}: no checkpoint")):
    app.run(config, str(empty), "visualize")
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f"--workdir={tmp_path / 'nowhere'}: no such")):
    app.run(config, str(tmp_path / "nowhere"), "visualize")
  with pytest.raises(ValueError, match="--split='test'"):
    app.run(config, str(empty), "visualize", split="test")
