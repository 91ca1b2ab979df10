"""--mode=search: query folders ranked against gallery embeddings saved by --mode=extract."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from stmn_jax import app
from stmn_jax import retrieval
from stmn_jax import sharding
from stmn_jax import figures
from tests.test_export import _config, _perturbed_state, _save, _write_folder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREEN = (44, 160, 44)  # matplotlib "tab:green"
RED = (214, 39, 40)  # matplotlib "tab:red"


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("search")
  config = _config(tmp / "data")
  state = _perturbed_state(config, sharding.make_mesh(), 0)
  workdir = str(tmp / "work")
  _save(state, workdir, 2)
  gallery_dir = tmp / "gallery"
  _write_folder(gallery_dir, np.random.RandomState(3))  # a_png4 (pid 5), b_jpg8 (5), c_one (-1)
  gallery = app.run(config, workdir, "extract", input_dir=str(gallery_dir))
  query_dir = tmp / "query"
  shutil.copytree(gallery_dir / "b_jpg8", query_dir / "qb")  # a copy of a gallery tracklet
  other = tmp / "other"
  _write_folder(other, np.random.RandomState(9))
  shutil.copytree(other / "a_png4", query_dir / "qz")
  with open(query_dir / "tracklets.csv", "w") as f:
    f.write("tracklet,pid,camera\nqb,5,3\nqz,9,3\n")
  summary = app.run(config, workdir, "search", query=str(query_dir),
                    gallery=gallery["embeddings"])
  return config, workdir, gallery, query_dir, summary, tmp


def _cosine(q, g):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  g = g / np.linalg.norm(g, axis=1, keepdims=True)
  return 1.0 - q @ g.T


def test_copy_of_a_gallery_tracklet_ranks_first(searched):
  config, workdir, gallery, query_dir, summary, _ = searched
  assert config.eval.distance == "cosine"
  with open(os.path.join(workdir, "search", "results.json")) as f:
    saved = json.load(f)
  assert saved["results"] == summary["results"] and saved["metric"] == "cosine"
  by_name = {r["query"]: r for r in summary["results"]}
  assert sorted(by_name) == ["qb", "qz"]
  qb = by_name["qb"]["matches"]
  assert qb[0]["tracklet"] == "b_jpg8" and qb[0]["rank"] == 1
  assert abs(qb[0]["distance"]) < 1e-4
  assert (qb[0]["pid"], qb[0]["camera"]) == (5, 1)
  # Default top-k (10) is clipped to the 3 gallery tracklets; check against a direct ranking of
  # the query embeddings (same extract path) and the saved gallery embeddings.
  queries = app.run(config, workdir, "extract", input_dir=str(query_dir))
  q = np.load(queries["embeddings"], allow_pickle=False)
  g = np.load(gallery["embeddings"], allow_pickle=False)
  dist = _cosine(q, g)
  names = ["a_png4", "b_jpg8", "c_one"]
  for i, query in enumerate(("qb", "qz")):
    matches = by_name[query]["matches"]
    assert [m["rank"] for m in matches] == [1, 2, 3]
    assert [m["tracklet"] for m in matches] == [names[j] for j in np.argsort(dist[i])]
    np.testing.assert_allclose([m["distance"] for m in matches], np.sort(dist[i]), atol=1e-4)


def test_ranked_list_pictures(searched):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  _, workdir, _, _, summary, _ = searched
  counts = {}
  for result in summary["results"]:
    path = os.path.join(workdir, "search", result["query"] + ".png")
    assert result["picture"] == path
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB"))
    counts[result["query"]] = {
        name: int(np.all(pixels == np.array(color, np.uint8), axis=-1).sum())
        for name, color in (("green", GREEN), ("red", RED))}
  # qb (pid 5): the two pid-5 gallery tracklets framed green, c_one (pid -1) unframed.
  assert counts["qb"]["green"] > 100 and counts["qb"]["red"] == 0
  # qz (pid 9): the pid-5 tracklets framed red.
  assert counts["qz"]["red"] > 100 and counts["qz"]["green"] == 0


def test_frame_color_and_grey_tile():
  assert figures.frame_color(3, 3) == figures.MATCH_COLOR
  assert figures.frame_color(3, 4) == figures.MISMATCH_COLOR
  assert figures.frame_color(-1, 4) is None and figures.frame_color(3, -1) is None
  tile = figures._tile("/no/such/frame.png", 8, 4)  # pylint: disable=protected-access
  assert tile.shape == (8, 4, 3) and (tile == figures.GREY).all()
  order, top = retrieval.top_k(np.array([[0.5, 0.1, 0.9], [0.2, 0.2, 0.0]], np.float32), 2)
  np.testing.assert_array_equal(order, [[1, 0], [2, 0]])
  np.testing.assert_allclose(top, [[0.1, 0.5], [0.0, 0.2]])
  with pytest.raises(ValueError, match="--topk=0"):
    retrieval.top_k(np.zeros((1, 2)), 0)


def test_gallery_errors(searched):
  config, workdir, gallery, query_dir, _, tmp = searched
  lonely = tmp / "lonely.npy"
  shutil.copy(gallery["embeddings"], lonely)
  with pytest.raises(FileNotFoundError, match=r"lonely\.csv"):
    app.run(config, workdir, "search", query=str(query_dir), gallery=str(lonely))
  with open(gallery["index"]) as f:
    lines = f.readlines()
  with open(tmp / "lonely.csv", "w") as f:
    f.writelines(lines[:-1])  # one row short
  with pytest.raises(ValueError, match=r"lonely\.csv: 2 rows but .*lonely\.npy has 3"):
    app.run(config, workdir, "search", query=str(query_dir), gallery=str(lonely))
  with pytest.raises(FileNotFoundError, match=r"--gallery=.*nothing\.npy: no such file"):
    app.run(config, workdir, "search", query=str(query_dir), gallery=str(tmp / "nothing.npy"))
