"""bfloat16 compute with float32 parameters, optimizer state, BN statistics, softmaxes, losses.

A small STMN (ResNet-18 at width 0.125, 64x32 frames, L = 4, both memories on) is built twice
from the same seed, once with `config.model.dtype = "float32"` and once with "bfloat16"; the
parameters start equal. Tolerances (measured values on this machine in brackets):
- one engine train step (4 devices): |loss_bf16 - loss_f32| <= 5e-3 |loss_f32| (3e-4); each
  loss term and grad_norm within 2e-2 relative (< 3e-3);
- gradients (Adam's first moment after one step, mu = (1 - b1) g): whole network cosine
  >= 0.9 (0.950), ||g_bf16 - g_f32|| <= 0.45 ||g_f32|| (0.31: bf16 activations in the
  backbone's backward pass; a width-0.125 ResNet-18 trunk alone gives ~0.2, and float32
  accumulation in the convolutions does not lower it); each head parameter (classifiers,
  BNNecks, LSTM, memory keys) within 0.1 relative (<= 0.054), the memory parameters only where
  the spread loss picked the same queries in both runs (see the test);
- parameters: Adam's first step is about -lr sign(g), so the check is that the update signs
  agree on >= 80% of the moved scalars (95.5%), and no scalar differs by more than 2 lr;
- BN running statistics after the step: |diff| <= 2e-2 * max|stat| per variable (5e-3);
- retrieval on a small random gallery with the same (float32) weights: per-tracklet embedding
  cosine >= 0.99, |mAP diff| <= 0.03, rank-1 changes by at most one of the 12 queries
  (the float32 mAP must lie in (0.3, 0.99), so the gallery is neither trivial nor hopeless).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from stmn_jax import embedding, evaluation, models, sharding, train_state

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 4
STEPS_PER_EPOCH = 10


def _config(dtype: str):
  c = synthetic.get_config("smoke")
  c.model.name = "stmn"
  c.model.depth, c.model.width, c.model.pretrained = 18, 0.125, ""
  c.model.spatial_memory = c.model.temporal_memory = True
  c.data.height, c.data.width, c.data.seq_len = 64, 32, 4
  c.data.num_ids_per_batch, c.data.num_tracklets_per_id = 4, 2
  c.model.dtype = dtype
  return c


def _model_fn(config, num_classes, rngs):
  return models.create_model(config, num_classes, rngs, load_weights=False)


def _loss_with_picks(outputs, batch, config, rng=None):
  """The engine's loss; its terms also hold the memory spread loss's picks per slot, the queries
  with the largest and the smallest probability: `picks/<probs>` int32 (2, slots)."""
  loss, terms = train_state.default_loss_fn(outputs, batch, config, rng=rng)
  for name in ("spatial_probs", "temporal_probs"):
    probs = outputs[name].reshape(-1, outputs[name].shape[-1])
    terms[f"picks/{name}"] = jnp.stack([jnp.argmax(probs, 0), jnp.argmin(probs, 0)])
  return loss, terms


def _flat(tree) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return out


def _train_batch() -> dict[str, np.ndarray]:
  rs = np.random.RandomState(0)
  return {
      "frames": rs.randn(8, 4, 64, 32, 3).astype(np.float32),
      "pid": (np.arange(8) // 2).astype(np.int32),
      "camid": (np.arange(8) % 2).astype(np.int32),
  }


def _gallery(num_ids: int = 12):
  """Per identity a smooth random pattern; 1 query (cam 0) + 2 gallery clips (cam 1) with their
  own noise (std 1.5: neither trivial nor hopeless for the untrained model); 4 distractor clips
  -> frames (40, 4, 64, 32, 3), pids (-1: distractor), camids."""
  rs = np.random.RandomState(1)
  clips, pids, cams = [], [], []
  for pid in list(range(num_ids)) + [-1] * 4:
    base = np.kron(rs.randn(8, 4, 3), np.ones((8, 8, 1)))  # (64, 32, 3) blocks
    for cam in ((0, 1, 1) if pid >= 0 else (1,)):
      clips.append(base[None] + 1.5 * rs.randn(4, 64, 32, 3))
      pids.append(pid)
      cams.append(cam)
  frames = np.stack(clips).astype(np.float32)
  return frames, np.asarray(pids), np.asarray(cams)


@pytest.fixture(scope="module")
def runs():
  mesh = sharding.make_mesh()
  frames, pids, cams = _gallery()
  gframes = sharding.global_batch({"frames": frames}, mesh)["frames"]
  batch = _train_batch()
  out, states, lr_fns = {}, {}, {}
  for dtype in ("float32", "bfloat16"):
    config = _config(dtype)
    state, lr_fns[dtype] = train_state.create_train_state(
        config, NUM_CLASSES, STEPS_PER_EPOCH, mesh, _model_fn)
    states[dtype] = state
    out[dtype] = {"init": _flat(jax.device_get(nnx.to_pure_dict(state.model_state)))}
  # Retrieval: both compute dtypes on the same float32 weights.
  f32_state = states["float32"].model_state
  for dtype, state in states.items():
    embed = embedding.make_embed_fn(state, mesh, flip=False)
    out[dtype]["emb"] = jax.device_get(embed(f32_state, gframes))
    gd = state.model_def_train  # train-mode forward, shapes and dtypes only (no compile)
    outputs = jax.eval_shape(
        lambda st, f, gd=gd: nnx.merge(gd, st)(f), state.model_state, batch["frames"])
    out[dtype]["out_dtypes"] = {k: v.dtype for k, v in outputs.items()}
  for dtype, state in states.items():
    config = _config(dtype)
    step_fn = train_state.make_train_step(
        state, config, mesh, lr_fns[dtype], loss_fn=_loss_with_picks)
    metrics = train_state.train_step(state, step_fn, sharding.global_batch(batch, mesh))
    metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    out[dtype]["picks"] = {k: metrics.pop(k) for k in list(metrics) if k.startswith("picks/")}
    out[dtype]["metrics"] = metrics
    out[dtype]["after"] = _flat(jax.device_get(nnx.to_pure_dict(state.model_state)))
    out[dtype]["opt"] = _flat(jax.device_get(nnx.to_pure_dict(state.opt_state)))
    out[dtype]["lr"] = config.optim.learning_rate
  out["gallery"] = (pids, cams)
  return out


def test_state_stays_float32_and_compute_is_bfloat16(runs):
  f32, bf16 = runs["float32"], runs["bfloat16"]
  assert f32["init"].keys() == bf16["init"].keys()
  for k in f32["init"]:  # same seed, float32 parameters whatever the compute dtype
    np.testing.assert_array_equal(f32["init"][k], bf16["init"][k], err_msg=k)
  for k, v in bf16["after"].items():
    assert v.dtype == np.float32, f"model state {k} is {v.dtype}"
  stats = [k for k in bf16["after"] if k.endswith(("/mean", "/var"))]
  assert len(stats) > 20  # the trunk, stages, memory and neck BatchNorms
  floats = {k: v for k, v in bf16["opt"].items() if np.issubdtype(v.dtype, np.floating)}
  assert any("mu" in k for k in floats) and any("nu" in k for k in floats)
  for k, v in floats.items():
    assert v.dtype == np.float32, f"optimizer state {k} is {v.dtype}"
  for k, v in bf16["metrics"].items():
    assert v.dtype == np.float32, f"metric {k} is {v.dtype}"
  d = bf16["out_dtypes"]
  assert d["frame_feats"] == jnp.bfloat16 and d["seq_logits"] == jnp.bfloat16  # really bf16
  for k in ("spatial_probs", "temporal_probs", "frame_weights"):
    assert d[k] == jnp.float32, f"{k} is {d[k]}"
  assert all(v == jnp.float32 for v in runs["float32"]["out_dtypes"].values())


def test_bfloat16_step_close_to_float32_step(runs):
  f32, bf16 = runs["float32"], runs["bfloat16"]
  mf, mb = f32["metrics"], bf16["metrics"]
  np.testing.assert_allclose(mb["loss"], mf["loss"], rtol=5e-3)
  for k in mf:
    if k not in ("loss", "lr"):
      np.testing.assert_allclose(mb[k], mf[k], rtol=2e-2, atol=1e-4, err_msg=k)
  # Gradients: after Adam's first step mu = (1 - b1) g, g including the coupled L2 term.
  mu = sorted(k for k in f32["opt"] if "/mu/" in k)
  assert mu and mu == sorted(k for k in bf16["opt"] if "/mu/" in k)
  gf = np.concatenate([f32["opt"][k].ravel() for k in mu])
  gb = np.concatenate([bf16["opt"][k].ravel() for k in mu])
  assert np.linalg.norm(gf) > 0
  cos = gf @ gb / (np.linalg.norm(gf) * np.linalg.norm(gb))
  rel = np.linalg.norm(gb - gf) / np.linalg.norm(gf)
  print(f"gradient cosine {cos:.5f}, relative error {rel:.4f}")
  # Whole network: bf16 activations in the backbone's backward pass give ~20-30% relative
  # gradient noise at this width (a ResNet-18 trunk alone at width 0.125 gives ~20%).
  assert cos >= 0.9 and rel <= 0.45, (cos, rel)
  # The head (classifiers, BNNecks, LSTM, memory keys) sees little of it. Relative errors
  # measured here, seeds 0-3 (test data and model): classifiers and BNNecks 0.035-0.049; memory
  # keys and LSTM 0.041-0.063 where the picks below agree (0.041-0.054 at seed 0). Bound 0.1:
  # about twice the largest.
  head = [k for k in mu if k.split("/mu/")[1].startswith(
      ("frame_classifier", "seq_classifier", "frame_neck", "seq_neck", "temporal_memory/lstm",
       "spatial_memory/mem_keys", "temporal_memory/mem_keys"))]
  assert len(head) == 9, head
  head_rel = {k.split("/mu/")[1]: float(
      np.linalg.norm(bf16["opt"][k] - f32["opt"][k]) / np.linalg.norm(f32["opt"][k]))
      for k in head}
  print("head gradient relative errors:",
        {k: round(v, 4) for k, v in sorted(head_rel.items())})
  # At initialisation the memory parameters' gradients come mostly from the spread loss, which
  # per slot only reaches the query with the largest and the one with the smallest probability.
  # With these noise clips such picks are near-ties (gaps down to 1e-4, against bf16 probability
  # changes of ~1e-3); where one flips, that memory's gradients move by 0.42-0.66: seeds 1 and 3;
  # seed 0 while the addressing was computed in bf16, whose noise flipped a temporal pick. They
  # do so also with both memories in float32 and, at seed 1, in a float32 model whose input
  # frames are just rounded to bf16: the loss's discontinuity, not precision. So for a flipped
  # pick only the order of magnitude is checked here; the memories' own bf16 arithmetic is
  # checked exactly in test_memory.py.
  flipped = tuple(  # "spatial_memory" / "temporal_memory" where a pick differs
      k.split("/")[1].replace("_probs", "_memory") for k in sorted(f32["picks"])
      if not np.array_equal(f32["picks"][k], bf16["picks"][k]))
  print("memories whose spread-loss picks differ:", flipped or "none")
  for k, v in head_rel.items():
    assert v <= (1.0 if k.split("/")[0] in flipped else 0.1), (k, v, flipped)
  # Parameters: Adam's first step is about -lr sign(g), so updates agree where g is not tiny.
  params = [k for k in f32["after"] if not k.endswith(("/mean", "/var"))]
  uf = np.concatenate([(f32["after"][k] - f32["init"][k]).ravel() for k in params])
  ub = np.concatenate([(bf16["after"][k] - bf16["init"][k]).ravel() for k in params])
  moved = np.abs(uf) > 1e-7
  agree = np.mean(np.sign(uf[moved]) == np.sign(ub[moved]))
  print(f"update sign agreement {agree:.4f} over {moved.sum()} scalars")
  assert agree >= 0.8, agree
  lr = f32["lr"]
  for k in params:
    assert np.abs(f32["after"][k] - bf16["after"][k]).max() <= 2 * lr + 1e-6, k
  for k in f32["after"]:
    if k.endswith(("/mean", "/var")):
      a, b = f32["after"][k], bf16["after"][k]
      assert not np.array_equal(a, f32["init"][k]), k  # the statistics were updated
      assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max() + 1e-6, k


def test_ranking_barely_moves(runs):
  pids, cams = runs["gallery"]
  ef, eb = runs["float32"]["emb"], runs["bfloat16"]["emb"]
  assert ef.dtype == eb.dtype == np.float32
  cos = np.sum(ef * eb, 1) / (np.linalg.norm(ef, axis=1) * np.linalg.norm(eb, axis=1))
  assert cos.min() >= 0.99, cos.min()
  q = cams == 0
  res = {}
  for name, e in (("f32", ef), ("bf16", eb)):
    res[name] = evaluation.evaluate(
        e[q], e[~q], pids[q], pids[~q], cams[q], cams[~q], distance="cosine", rerank=False,
        ap="noninterp", max_rank=5)
  num_q = int(q.sum())
  print({k: (round(float(v["mAP"]), 4), round(float(v["cmc"][0]), 4)) for k, v in res.items()},
        f"min embedding cosine {cos.min():.5f}")
  # The gallery is not trivially hard or easy for the float32 model (else nothing is tested).
  assert 0.3 < res["f32"]["mAP"] < 0.99, res["f32"]["mAP"]
  assert abs(res["bf16"]["mAP"] - res["f32"]["mAP"]) <= 0.03
  assert abs(res["bf16"]["cmc"][0] - res["f32"]["cmc"][0]) <= 1.0 / num_q + 1e-9
