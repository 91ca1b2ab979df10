"""Distances, clip pooling, feature extraction, re-ranking, `evaluate`, the table and the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from stmn_jax import evaluation, pooling, ranking

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ distances
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_pairwise_distance_against_numpy(chunk_size):
  rng = np.random.default_rng(0)
  q, g = rng.standard_normal((7, 5)), rng.standard_normal((9, 5))
  cos = 1 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
      g / np.linalg.norm(g, axis=1, keepdims=True)).T
  sq = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
  for metric, want in (("cosine", cos), ("euclidean", np.sqrt(sq)), ("sqeuclidean", sq)):
    got = ranking.pairwise_distance(q, g, metric, chunk_size=chunk_size)
    assert got.shape == (7, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="manhattan"):
    ranking.pairwise_distance(q, g, "manhattan")
  with pytest.raises(ValueError, match="same D"):
    ranking.pairwise_distance(q, g[:, :4])


# ------------------------------------------------------------------------------ pooling
def test_pool_clips_means_valid_clips_and_ignores_padding():
  rng = np.random.default_rng(1)
  emb = rng.standard_normal((7, 4)).astype(np.float32)
  index = np.array([2, 0, 2, 1, 0, -1, 1])
  mask = np.array([True, True, True, True, False, False, True])  # row 4: padding with index 0
  got = pooling.pool_clips(emb, index, mask, 3)
  want = np.stack([emb[[1]].mean(0), emb[[3, 6]].mean(0), emb[[0, 2]].mean(0)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pool_clips_errors():
  emb = np.ones((3, 2), np.float32)
  with pytest.raises(ValueError, match=r"no valid clip.*\[1\]"):
    pooling.pool_clips(emb, np.array([0, 1, 2]), np.array([True, False, True]), 3)
  with pytest.raises(ValueError, match="outside"):
    pooling.pool_clips(emb, np.array([0, 3, 1]), np.array([True, True, True]), 3)
  with pytest.raises(ValueError, match="tracklet_index"):
    pooling.pool_clips(emb, np.array([0, 1]), np.array([True, True, True]), 2)


# ------------------------------------------------------------------------------ extraction
def _eval_batches(rng, num_tracklets, batch_size=4, clips_per_tracklet=(1, 3)):
  """Clips of every tracklet once, in batches padded with mask False / index -1."""
  rows = [t for t in range(num_tracklets) for _ in range(rng.integers(*clips_per_tracklet))]
  rng.shuffle(rows)
  frames = rng.standard_normal((len(rows), 2, 4, 3, 3)).astype(np.float32)
  batches = []
  for start in range(0, len(rows), batch_size):
    idx = np.asarray(rows[start:start + batch_size])
    f = frames[start:start + batch_size]
    pad = batch_size - idx.size
    batches.append({
        "frames": np.concatenate([f, np.zeros((pad,) + f.shape[1:], np.float32)]),
        "mask": np.arange(batch_size) < idx.size,
        "tracklet_index": np.concatenate([idx, -np.ones(pad, int)]).astype(np.int32),
    })
  return batches, frames, np.asarray(rows)


def test_extract_features_with_a_sharded_embed_fn():
  rng = np.random.default_rng(2)
  batches, frames, rows = _eval_batches(rng, num_tracklets=5)
  mesh = jax.make_mesh((4,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  embed = jax.jit(lambda x: {"embedding": x.mean(axis=(1, 2, 3)) * 2.0})

  def embed_fn(frames_batch):
    out = embed(jax.device_put(frames_batch, sharding))
    assert len(out["embedding"].sharding.device_set) == 4  # really a sharded array
    return out

  got = pooling.extract_features(embed_fn, batches, 5)
  clip_emb = frames.mean(axis=(1, 2, 3)) * 2.0
  want = np.stack([clip_emb[rows == t].mean(0) for t in range(5)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert isinstance(got, np.ndarray) and got.shape == (5, 3)


def test_extract_features_errors():
  batches, _, _ = _eval_batches(np.random.default_rng(3), num_tracklets=3)
  with pytest.raises(ValueError, match="rows"):
    pooling.extract_features(lambda f: np.zeros((1, 3)), batches, 3)
  with pytest.raises(ValueError, match="tracklet_index"):
    pooling.extract_features(lambda f: f, [{"frames": 1, "mask": 1}], 3)
  with pytest.raises(ValueError, match="no valid clip"):
    pooling.extract_features(lambda f: f.mean(axis=(1, 2, 3)), batches, 4)


# ------------------------------------------------------------------------------ re-ranking
def reference_re_ranking(q_g, q_q, g_g, k1, k2, lam):
  """A direct loop reading of k-reciprocal re-ranking (Zhong et al. 2017), dense V."""
  nq = q_g.shape[0]
  dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
  dist = (dist / dist.max(axis=0)).T
  n = dist.shape[0]
  ranking = np.argsort(dist, axis=1, kind="stable")

  def recip(i, k):
    return [j for j in ranking[i, :k + 1] if i in ranking[j, :k + 1]]

  v = np.zeros((n, n))
  for i in range(n):
    r = recip(i, k1)
    expanded = set(r)
    for c in r:
      rc = recip(c, int(np.around(k1 / 2)))
      if len(set(rc) & set(r)) > 2 / 3 * len(rc):
        expanded |= set(rc)
    members = sorted(expanded)
    w = np.exp(-dist[i, members])
    v[i, members] = w / w.sum()
  if k2 != 1:
    v = np.stack([v[ranking[i, :k2]].mean(0) for i in range(n)])
  final = np.zeros(q_g.shape)
  for i in range(nq):
    for j in range(q_g.shape[1]):
      a, b = v[i], v[nq + j]
      jaccard = 1 - np.minimum(a, b).sum() / np.maximum(a, b).sum()
      final[i, j] = (1 - lam) * jaccard + lam * dist[i, nq + j]
  return final


def _clustered(rng, num_ids, per_id_q, per_id_g, dim=6, spread=0.05):
  centres = rng.standard_normal((num_ids, dim)) * 3
  q_pids = np.repeat(np.arange(num_ids), per_id_q)
  g_pids = np.repeat(np.arange(num_ids), per_id_g)
  q = centres[q_pids] + spread * rng.standard_normal((q_pids.size, dim))
  g = centres[g_pids] + spread * rng.standard_normal((g_pids.size, dim))
  return q, g, q_pids, g_pids


@pytest.mark.parametrize("k1,k2,lam", [(4, 3, 0.3), (3, 1, 0.5)])
def test_re_ranking_against_reference_loop(k1, k2, lam):
  rng = np.random.default_rng(4)
  q, g, _, _ = _clustered(rng, 4, 2, 4, spread=1.5)  # overlapping clusters: non-trivial sets
  d = lambda a, b: ranking.pairwise_distance(a, b, "euclidean")
  got = ranking.re_ranking(d(q, g), d(q, q), d(g, g), k1=k1, k2=k2, lambda_value=lam)
  want = reference_re_ranking(d(q, g), d(q, q), d(g, g), k1, k2, lam)
  assert got.shape == (8, 16)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_re_ranking_keeps_a_separated_case_correct():
  rng = np.random.default_rng(5)
  q, g, q_pids, g_pids = _clustered(rng, 5, 1, 4)
  q_cams, g_cams = np.zeros(q_pids.size, int), np.ones(g_pids.size, int)
  res = ranking.evaluate(q, g, q_pids, g_pids, q_cams, g_cams, rerank=True, max_rank=4)
  assert res["mAP"] == pytest.approx(1.0) and res["R1"] == 1.0
  d = lambda a, b: ranking.pairwise_distance(a, b)
  rr = ranking.re_ranking(d(q, g), d(q, q), d(g, g), k1=4, k2=2)
  same = q_pids[:, None] == g_pids[None, :]
  assert (rr[same].reshape(5, 4).max(1) < np.where(same, np.inf, rr).min(1)).all()


def test_re_ranking_errors():
  with pytest.raises(ValueError, match="q_q"):
    ranking.re_ranking(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((3, 3)))


# ------------------------------------------------------------------------------ evaluate
def _features_case(rng):
  q, g, q_pids, g_pids = _clustered(rng, 6, 2, 5, spread=2.0)
  return q, g, q_pids, g_pids, rng.integers(0, 3, q_pids.size), rng.integers(0, 3, g_pids.size)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_evaluate_is_distance_then_rank(distance):
  q, g, qp, gp, qc, gc = _features_case(np.random.default_rng(6))
  res = ranking.evaluate(q, g, qp, gp, qc, gc, distance=distance, ap="matlab", max_rank=10)
  want = ranking.rank_reference(
      ranking.pairwise_distance(q, g, distance), qp, gp, qc, gc, max_rank=10, ap="matlab")
  np.testing.assert_allclose(res["cmc"], want["cmc"])
  assert res["mAP"] == pytest.approx(want["mAP"])
  assert [res[f"R{k}"] for k in (1, 5, 10)] == [want["cmc"][k - 1] for k in (1, 5, 10)]
  assert "R20" not in res


def test_format_table():
  res = {"cmc": np.linspace(0.5, 1.0, 20), "mAP": 0.4321, "mINP": 0.1234,
         "num_valid_queries": 9, "num_queries_without_match": 1}
  header, row = ranking.format_table(res).splitlines()
  assert header.split() == ["R1", "R5", "R10", "R20", "mAP", "mINP", "queries"]
  values = row.split()
  assert [float(v) for v in values[:6]] == pytest.approx(
      [100 * res["cmc"][k - 1] for k in (1, 5, 10, 20)] + [43.21, 12.34], abs=0.006)
  assert values[6] == "9/10"


# ------------------------------------------------------------------------------ CLI
def _write_npz(path, rng, drop=None):
  q, g, qp, gp, qc, gc = _features_case(rng)
  arrays = dict(q_feats=q, g_feats=g, q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc)
  arrays.pop(drop, None)
  np.savez(path, **arrays)
  return arrays


def test_cli_json(tmp_path, capsys):
  path = str(tmp_path / "feats.npz")
  a = _write_npz(path, np.random.default_rng(7))
  assert ranking.cli.main([f"--features={path}", "--distance=euclidean", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  want = ranking.evaluate(a["q_feats"], a["g_feats"], a["q_pids"], a["g_pids"],
                             a["q_camids"], a["g_camids"], distance="euclidean")
  assert out["mAP"] == pytest.approx(want["mAP"]) and out["mINP"] == pytest.approx(want["mINP"])
  np.testing.assert_allclose(out["cmc"], want["cmc"])
  assert out["num_valid_queries"] == want["num_valid_queries"]
  assert (out["distance"], out["ap"], out["rerank"]) == ("euclidean", "noninterp", False)


def test_cli_table_and_missing_key(tmp_path, capsys):
  path = str(tmp_path / "feats.npz")
  _write_npz(path, np.random.default_rng(8))
  assert ranking.cli.main(["--features", path, "--ap=matlab"]) == 0
  assert capsys.readouterr().out.split()[:7] == ["R1", "R5", "R10", "R20", "mAP", "mINP",
                                                 "queries"]
  bad = str(tmp_path / "nogallery.npz")
  _write_npz(bad, np.random.default_rng(8), drop="g_camids")
  assert ranking.cli.main([f"--features={bad}"]) == 2
  err = capsys.readouterr().err
  assert "g_camids" in err and bad in err
  assert ranking.cli.main([f"--features={tmp_path / 'absent.npz'}"]) == 2
  assert "absent.npz" in capsys.readouterr().err


def test_cli_rejects_pickled_arrays(tmp_path, capsys):
  path = str(tmp_path / "obj.npz")
  arrays = _write_npz(path, np.random.default_rng(9))
  arrays["q_pids"] = np.array([{"x": 1}] * arrays["q_feats"].shape[0], dtype=object)
  np.savez(path, **arrays)
  assert ranking.cli.main([f"--features={path}"]) == 2
  assert path in capsys.readouterr().err


@pytest.mark.parametrize("module", ["stmn_jax.ranking", "stmn_jax.evaluation"])  # new, old
def test_python_dash_m_entry_point(tmp_path, module):
  path = str(tmp_path / "feats.npz")
  a = _write_npz(path, np.random.default_rng(10))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", module, f"--features={path}", "--json"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  want = ranking.evaluate(a["q_feats"], a["g_feats"], a["q_pids"], a["g_pids"],
                             a["q_camids"], a["g_camids"])
  assert out["mAP"] == pytest.approx(want["mAP"])


def _write_extracted(prefix, feats, pids, camids, rows=None):
  """The files `main.py --mode=extract` writes: PREFIX.npy and PREFIX.csv."""
  np.save(f"{prefix}.npy", feats)
  lines = ["tracklet,pid,camera,num_frames,first_frame"]
  lines += [f"t{i},{p},{c},3,f{i}.jpg" for i, (p, c) in enumerate(zip(pids, camids))]
  with open(f"{prefix}.csv", "w") as f:
    f.write("\n".join(lines[: rows + 1] if rows is not None else lines) + "\n")


def test_cli_on_extracted_query_and_gallery(tmp_path, capsys):
  a = _write_npz(str(tmp_path / "unused.npz"), np.random.default_rng(9))
  _write_extracted(tmp_path / "query", a["q_feats"], a["q_pids"], a["q_camids"])
  _write_extracted(tmp_path / "gallery", a["g_feats"], a["g_pids"], a["g_camids"])
  args = [f"--query={tmp_path / 'query.npy'}", f"--gallery={tmp_path / 'gallery.npy'}", "--json"]
  assert ranking.cli.main(args) == 0
  out = json.loads(capsys.readouterr().out)
  want = ranking.evaluate(a["q_feats"], a["g_feats"], a["q_pids"], a["g_pids"],
                             a["q_camids"], a["g_camids"])
  assert out["mAP"] == pytest.approx(want["mAP"])
  np.testing.assert_allclose(out["cmc"], want["cmc"])
  # An index CSV one row short is named in the error.
  _write_extracted(tmp_path / "short", a["g_feats"], a["g_pids"], a["g_camids"],
                   rows=len(a["g_pids"]) - 1)
  args[1] = f"--gallery={tmp_path / 'short.npy'}"
  assert ranking.cli.main(args) == 2
  assert "short.csv" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # --features and --query/--gallery exclude each other
    ranking.cli.main([f"--features={tmp_path / 'unused.npz'}",
                      f"--query={tmp_path / 'query.npy'}"])


def test_cli_defaults_are_the_config_defaults():
  """The library does not import configs: its CLI defaults are a copy, checked here."""
  e = default.get_config().eval
  assert ranking.CLI_DEFAULTS == {k: e[k] for k in ranking.CLI_DEFAULTS}
  assert set(ranking.CLI_DEFAULTS) == {"distance", "rerank", "ap", "max_rank"}


def test_evaluation_module_keeps_the_old_names():
  for name in ("pairwise_distance", "rank", "rank_reference", "rank_streaming",
               "rank_distance_blocks", "re_ranking", "evaluate", "format_table", "json_ready",
               "load_features", "AP_MODES", "METRICS", "NPZ_KEYS", "TABLE_RANKS", "STREAM_ABOVE"):
    assert getattr(evaluation, name) is getattr(ranking, name), name
  assert evaluation.pool_clips is pooling.pool_clips
  assert evaluation.extract_features is pooling.extract_features
