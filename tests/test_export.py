"""--mode=export: SavedModel reloaded with plain TensorFlow, parameter checkpoint, eval from it."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from stmn_jax import app
from stmn_jax import checkpoints
from stmn_jax import sharding
from stmn_jax import inference
from stmn_jax import run_setup
from stmn_jax import train_state


def _config(root, preset="smoke"):
  config = synthetic.get_config(preset)
  config.dataset.root = str(root)
  config.model.depth, config.model.width = 18, 0.125
  config.data.eval_batch_size = 16
  return config


def _perturbed_state(config, mesh, seed):
  """A train state whose parameters and BN statistics are moved off their init values."""
  train_split, _, _, _ = run_setup.load_data(config)
  num_classes = len({t.pid for t in train_split.train})
  state, _ = train_state.create_train_state(config, num_classes, 4, mesh)
  leaves, treedef = jax.tree.flatten(state.model_state)
  rng = np.random.RandomState(seed)
  leaves = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
            if "var" not in str(p) else np.asarray(x) * (1.0 + 0.5 * rng.rand(*x.shape))
            for p, x in zip(jax.tree_util.tree_flatten_with_path(state.model_state)[0], leaves)]
  state.model_state = jax.device_put(jax.tree.unflatten(treedef, leaves),
                                     sharding.replicated(mesh))
  return state


def _save(state, workdir, step):
  with checkpoints.Checkpointer(workdir) as ckpt:
    ckpt.save(step, state.checkpoint_tree())
    ckpt.wait()


def _reference(state, config, frames_u8):
  """The eval-mode JAX model on normalised frames, averaged with the mirrored clip."""
  x = (frames_u8.astype(np.float32) / 255.0 - np.asarray(config.data.mean, np.float32)) \
      / np.asarray(config.data.std, np.float32)

  @jax.jit
  def embed(model_state, x):
    model = nnx.merge(state.model_def_eval, model_state)
    return 0.5 * (model(x)["embedding"] + model(x[:, :, :, ::-1])["embedding"])

  return np.asarray(embed(jax.device_get(state.model_state), x))


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("export")
  config = _config(tmp / "data")
  mesh = sharding.make_mesh()
  state = _perturbed_state(config, mesh, 0)
  workdir = str(tmp / "work")
  _save(state, workdir, 3)
  summary = app.run(config, workdir, "export")
  return config, state, workdir, summary, tmp


def test_saved_model_matches_jax_model(trained):
  config, state, workdir, summary, _ = trained
  assert summary["checkpoint"] == "latest checkpoint (step 3)"
  path = os.path.join(workdir, "export", "saved_model")
  assert summary["saved_model"] == path
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  loaded = tf.saved_model.load(path)
  serve = loaded.signatures["serving_default"]
  spec = serve.structured_input_signature[1]["frames"]
  assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 4, 64, 32, 3]
  frames = np.random.RandomState(1).randint(0, 256, (3, 4, 64, 32, 3)).astype(np.uint8)
  want = _reference(state, config, frames)  # eval mode: a row does not depend on the batch
  for batch in (1, 3):
    got = serve(frames=tf.constant(frames[:batch]))["embedding"].numpy()
    assert got.shape == (batch, 64)
    np.testing.assert_allclose(got, want[:batch], atol=1e-4, rtol=1e-4)
  # The embedding depends on the input (not a constant of the parameters).
  a = serve(frames=tf.zeros([1, 4, 64, 32, 3], tf.uint8))["embedding"].numpy()
  b = serve(frames=tf.fill([1, 4, 64, 32, 3], tf.constant(200, tf.uint8)))["embedding"].numpy()
  assert np.abs(a - b).max() > 1e-3


def test_params_checkpoint_roundtrip_and_eval(trained):
  config, state, workdir, summary, tmp = trained
  assert summary["params"] == os.path.join(workdir, "export", "params")
  fresh = _perturbed_state(config, sharding.make_mesh(), 7)
  restored = inference.load_params(summary["params"], fresh.model_state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.model_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A workdir holding only export/params: --mode=eval uses it, same numbers as the checkpoint.
  only = tmp / "only_params"
  shutil.copytree(summary["params"], only / "export" / "params")
  from_params = app.run(config, str(only), "eval")
  assert from_params["test_checkpoint"].startswith("exported parameters")
  from_ckpt = app.run(config, workdir, "eval")
  assert from_ckpt["test_checkpoint"] == "latest checkpoint (step 3)"
  np.testing.assert_allclose(from_params["test"]["mAP"], from_ckpt["test"]["mAP"], atol=1e-6)
  np.testing.assert_allclose(from_params["test"]["cmc"], from_ckpt["test"]["cmc"], atol=1e-6)


def test_checkpoint_of_another_model_is_refused(trained):
  config, _, _, summary, tmp = trained
  base_config = _config(config.dataset.root, "baseline,smoke")
  base = _perturbed_state(base_config, sharding.make_mesh(), 2)
  workdir = str(tmp / "baseline_work")
  _save(base, workdir, 1)
  with pytest.raises(ValueError, match=r"baseline_work/checkpoints/1 does not match the "
                     r"configured model.*keys missing from the checkpoint"):
    app.run(config, workdir, "export")
  assert not os.path.exists(os.path.join(workdir, "export"))
  # The parameter checkpoint: stmn parameters into a baseline model.
  with pytest.raises(ValueError, match=r"export/params does not match.*keys the model does "
                     r"not have"):
    inference.load_params(summary["params"], base.model_state)
  # No checkpoint at all.
  os.makedirs(tmp / "empty_work")
  with pytest.raises(FileNotFoundError, match="train first"):
    app.run(config, str(tmp / "empty_work"), "export")


def _write_folder(root, rng):
  """Three tracklets: 4 PNG frames, 8 JPEG frames, 1 PNG frame (64x32, the model's size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  frames = {}
  for name, n, ext in (("a_png4", 4, "png"), ("b_jpg8", 8, "jpg"), ("c_one", 1, "png")):
    os.makedirs(root / name)
    frames[name] = []
    for i in range(n):
      pixels = rng.randint(0, 256, (64, 32, 3)).astype(np.uint8)
      path = root / name / f"{i:03d}.{ext}"
      Image.fromarray(pixels).save(path, quality=95)
      frames[name].append(str(path))
  with open(root / "tracklets.csv", "w") as f:
    f.write("tracklet,pid,camera\na_png4,5,0\nb_jpg8,5,1\n")
  return frames


def _decode(paths):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return np.stack([tf.io.decode_image(tf.io.read_file(p), channels=3).numpy() for p in paths])


def test_extract_folder_matches_jax_model(trained):
  config, state, workdir, _, tmp = trained
  folder = tmp / "my_tracklets"
  paths = _write_folder(folder, np.random.RandomState(3))
  summary = app.run(config, workdir, "extract", input_dir=str(folder))
  feats = np.load(summary["embeddings"], allow_pickle=False)
  assert feats.shape == (3, 64) and feats.dtype == np.float32
  with open(summary["index"]) as f:
    rows = [line.strip().split(",") for line in f]
  assert rows[0] == ["tracklet", "pid", "camera", "num_frames", "first_frame"]
  assert [r[:4] for r in rows[1:]] == [["a_png4", "5", "0", "4"], ["b_jpg8", "5", "1", "8"],
                                       ["c_one", "-1", "-1", "1"]]
  a, b, c = (_decode(paths[k]) for k in ("a_png4", "b_jpg8", "c_one"))
  # All-frames interleaved clips: 4 frames -> one clip; 8 -> frames 0,2,4,6 and 1,3,5,7;
  # one frame -> repeated L times.
  clips = np.stack([a, b[0::2], b[1::2], np.repeat(c, 4, axis=0)])
  ref = _reference(state, config, clips)
  want = np.stack([ref[0], 0.5 * (ref[1] + ref[2]), ref[3]])
  np.testing.assert_allclose(feats, want, atol=1e-4, rtol=1e-4)


def test_extract_split_and_folder_errors(trained):
  config, _, workdir, _, tmp = trained
  summary = app.run(config, workdir, "extract", split="gallery")
  feats = np.load(summary["embeddings"], allow_pickle=False)
  _, _, test_split, _ = run_setup.load_data(config)
  gallery = test_split.gallery
  assert feats.shape == (len(gallery), 64) and np.isfinite(feats).all()
  with open(summary["index"]) as f:
    rows = [line.strip().split(",") for line in f][1:]
  assert [(int(r[1]), int(r[2]), int(r[3]), r[4]) for r in rows] == [
      (t.pid, t.camid, t.num_frames, t.frames[0]) for t in gallery]
  with pytest.raises(ValueError, match="--split='val': expected query, gallery or train"):
    app.run(config, workdir, "extract", split="val")
  # An empty tracklet folder, then an unreadable frame: errors name the folder / file.
  bad = tmp / "bad_folder"
  os.makedirs(bad / "t1")
  with pytest.raises(ValueError, match=r"bad_folder/t1 has no frames"):
    app.run(config, workdir, "extract", input_dir=str(bad))
  with open(bad / "t1" / "000.jpg", "wb") as f:
    f.write(b"not a jpeg at all")
  with pytest.raises(ValueError, match=r"(?s)unreadable.*tracklet 0.*bad_folder/t1/000.jpg"):
    app.run(config, workdir, "extract", input_dir=str(bad))


def test_extraction_progress_is_logged():
  lines = []
  log = lambda fmt, *args: lines.append(fmt % args)
  batches = inference.with_progress(iter(range(5)), 5, "demo", every=2, log=log)
  assert list(batches) == list(range(5))
  assert [line.split(",")[0] for line in lines] == [
      "demo: batch 2/5", "demo: batch 4/5", "demo: batch 5/5"]
  assert lines[-1].endswith("ETA 0.0 s")
