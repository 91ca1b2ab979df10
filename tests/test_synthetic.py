"""The synthetic benchmark: determinism, distractor knobs, MARS / DukeV layouts, reuse."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import scipy.io

from data_pipelines import synthetic
from data_pipelines.synthetic import __main__ as cli
from data_pipelines.synthetic import generator, layouts, render
from data_pipelines.synthetic.spec import SyntheticSpec, make_spec

# A tiny benchmark (32x16 frames, 7 ids): generates in well under a second.
TINY = dict(height=32, width=16, num_cameras=3, num_train_ids=4, num_test_ids=3,
            min_cameras_per_id=2, max_cameras_per_id=3, max_tracklets_per_camera=2,
            min_length=1, short_max_length=5, max_length=12, long_fraction=0.2,
            num_distractor_tracklets=2, num_junk_tracklets=2)
DISTRACTORS = {"occlusion": "occluded", "exit": "out_of_frame", "misalign": "misaligned",
               "intruder": "other_person"}
ALL_OFF = {f"{d}_prob": 0.0 for d in DISTRACTORS}


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _render_all(spec: SyntheticSpec):
  """[(plan, frames (T,H,W,3) uint8, events)] for every tracklet, in memory."""
  scene = generator.make_scene(spec)
  out = []
  for t in generator.make_plan(spec):
    frames, ev = generator.render_tracklet(scene, t)
    out.append((t, frames, ev))
  return out


# ----------------------------------------------------------------------------- knobs


def test_unknown_and_bad_knobs_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown synthetic knob\(s\) 'occlusion_porb'.*"
                                       r"valid knobs: .*occlusion_prob"):
    make_spec(occlusion_porb=0.1)
  with pytest.raises(ValueError, match=r"'occlusion_prob': expected a value in \[0, 1\]"):
    make_spec(occlusion_prob=1.5)
  with pytest.raises(ValueError, match="'layout': expected one of"):
    make_spec(layout="lsvid")
  with pytest.raises(ValueError, match="'num_train_ids': expected an integer"):
    make_spec(num_train_ids="many")
  with pytest.raises(ValueError, match="'occlusion_prob': expected a number"):
    make_spec(occlusion_prob="often")
  # Command-line strings that are numbers are taken as numbers.
  assert make_spec(num_train_ids="12").num_train_ids == 12
  assert make_spec(occlusion_prob="0.25").occlusion_prob == 0.25
  with pytest.raises(ValueError, match="'min_cameras_per_id'.*cross-camera"):
    make_spec(min_cameras_per_id=1)
  # CLI strings are converted to the knob's type.
  spec = make_spec({"height": "64", "occlusion_prob": "0.5"}, layout="dukev")
  assert (spec.height, spec.occlusion_prob, spec.layout) == (64, 0.5, "dukev")
  assert spec == make_spec(dataclasses.asdict(spec))


def test_config_knobs_are_the_spec_defaults():
  from configs import synthetic as cfg  # pylint: disable=g-import-not-at-top

  config = cfg.get_config()
  assert config.dataset.synthetic.to_dict() == dataclasses.asdict(SyntheticSpec())
  smoke = cfg.get_config("smoke")
  assert smoke.dataset.root != config.dataset.root
  spec = make_spec(smoke.dataset.synthetic)
  assert (spec.height, spec.width) == (64, 32)
  assert spec.num_train_ids + spec.num_test_ids == 12


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_frames(tmp_path):
  a = generator.generate(str(tmp_path / "a"), **TINY)
  b = generator.generate(str(tmp_path / "b"), **TINY)
  fa, fb = _files(str(tmp_path / "a")), _files(str(tmp_path / "b"))
  assert set(fa) == set(fb) and len(fa) > a["total_frames"]
  assert all(fa[k] == fb[k] for k in fa)
  assert a["splits"] == b["splits"]
  c = generator.generate(str(tmp_path / "c"), seed=1, **TINY)
  fc = _files(str(tmp_path / "c"))
  jpgs = [k for k in fa if k.endswith(".jpg") and k in fc]
  assert any(fa[k] != fc[k] for k in jpgs) or set(fa) != set(fc)
  with pytest.raises(FileExistsError, match="not empty"):
    generator.generate(str(tmp_path / "a"), **TINY)


# ----------------------------------------------------------------------------- distractors


@pytest.mark.parametrize("name", list(DISTRACTORS))
def test_each_temporal_distractor_touches_only_its_flagged_frames(name):
  flag = DISTRACTORS[name]
  off = _render_all(make_spec(TINY, **ALL_OFF))
  on = _render_all(make_spec(TINY, **dict(ALL_OFF, **{f"{name}_prob": 1.0})))
  people = 0
  for (t, f_off, e_off), (_, f_on, e_on) in zip(off, on):
    for f in generator.FLAGS:
      assert not e_off.flags[f].any()
      if f != flag:
        assert not e_on.flags[f].any()
    sel = e_on.flags[flag]
    if t.kind != "person":
      assert not sel.any()
      np.testing.assert_array_equal(f_on, f_off)
      continue
    people += 1
    assert sel.any(), (name, t)  # prob 1: every person tracklet has it
    np.testing.assert_array_equal(f_on[~sel], f_off[~sel])  # other frames bit-identical
    diff = np.abs(f_on[sel].astype(int) - f_off[sel].astype(int)).reshape(sel.sum(), -1)
    assert (diff.max(axis=1) > 40).all()  # every flagged frame visibly changed
  assert people > 10
  # Strength 0 or span 0 turns it off as well (same pixels as prob 0, no flags).
  for knob in ("strength", "span"):
    zero = _render_all(make_spec(TINY, **dict(ALL_OFF, **{f"{name}_prob": 1.0,
                                                         f"{name}_{knob}": 0.0})))
    for (_, f_off, _), (_, f_z, e_z) in zip(off, zero):
      np.testing.assert_array_equal(f_z, f_off)
      assert not any(e_z.flags[f].any() for f in generator.FLAGS)


def _clean(**kw) -> SyntheticSpec:
  """No noise, no camera colour cast: pixels are exact functions of the drawing."""
  return make_spec(TINY, **dict(ALL_OFF, noise_std=0.0, illumination_strength=0.0, **kw))


def test_occluder_covers_the_stated_part_of_the_first_frames():
  spec = _clean(occlusion_prob=1.0, occlusion_strength=0.5, occlusion_span=1.0)
  scene = generator.make_scene(spec)
  t = next(p for p in generator.make_plan(spec) if p.kind == "person" and p.length >= 3)
  frames, ev = generator.render_tracklet(scene, t)
  occ = ev.occluder
  n = int(ev.flags["occluded"].sum())
  np.testing.assert_array_equal(ev.flags["occluded"], np.arange(t.length) < n)
  h, w = spec.height, spec.width
  c = occ["coverage"][0]
  assert c == pytest.approx(0.5)
  ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
  if occ["side"] == 0:
    region = np.broadcast_to((ys >= h * (1 - c))[:, None], (h, w))
  elif occ["side"] == 1:
    region = np.broadcast_to((xs < w * c)[None, :], (h, w))
  else:
    region = np.broadcast_to((xs >= w * (1 - c))[None, :], (h, w))
  colors = {tuple(np.floor(np.asarray(x) * 255 + 0.5).astype(int))
            for x in (occ["color"], occ["color2"])}
  got = {tuple(px) for px in frames[0][region].astype(int)}
  assert got <= colors and region.sum() >= h * w * 0.4
  assert not (frames[0][~region][:, None, :] == np.asarray(list(colors))[None]).all(-1).all()


def test_exit_leaves_only_background_in_the_last_frame():
  spec = _clean(exit_prob=1.0, exit_strength=1.0)
  scene = generator.make_scene(spec)
  for t in generator.make_plan(spec):
    if t.kind != "person":
      continue
    frames, ev = generator.render_tracklet(scene, t)
    assert ev.flags["out_of_frame"][-1]
    bg = render.background_frames(scene.backgrounds[t.camera - 1], ev.pan[-1:], spec.width)
    expected = np.floor(bg[0] * 255.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(frames[-1], expected)


def test_misaligned_boxes_move_only_on_flagged_frames():
  spec_on = make_spec(TINY, **dict(ALL_OFF, misalign_prob=1.0))
  spec_off = make_spec(TINY, **ALL_OFF)
  idents, _ = generator.make_identities(spec_on)
  for t in generator.make_plan(spec_on):
    if t.kind != "person":
      continue
    a = generator.make_events(spec_on, t, idents)
    b = generator.make_events(spec_off, t, idents)
    sel = a.flags["misaligned"]
    moved = (np.abs(a.main.cx - b.main.cx) > 1e-6) | (np.abs(a.main.hp - b.main.hp) > 1e-6)
    np.testing.assert_array_equal(moved, sel)


def test_clutter_off_gives_a_plain_background_and_on_a_busy_one():
  plain = _render_all(_clean(clutter_strength=0.0))
  busy = _render_all(_clean(clutter_strength=1.0))
  for (t, f0, _), (_, f1, _) in zip(plain, busy):
    if t.kind == "distractor":  # background boxes (at most a sliver of a person at the edge)
      grey = (f0 == 128).all(-1).mean()  # plain mid grey: 0.5 * 255 rounded
      assert grey > 0.6 and (f1 == 128).all(-1).mean() < 0.1
      assert f1.std() > 30
  # Density 0: no clutter objects, only the wall and ground (fewer distinct colours).
  sparse = render.camera_background(np.random.default_rng(0), 64, 32, 48, 1.0, 0.0)
  dense = render.camera_background(np.random.default_rng(0), 64, 32, 48, 1.0, 1.0)
  assert sparse.shape == dense.shape == (64, 48, 3)
  assert (np.abs(sparse - dense).max(-1) > 0.1).mean() > 0.05


def test_identities_unique_and_similar_pairs_differ_in_one_attribute():
  spec = make_spec(num_train_ids=30, num_test_ids=20, similar_fraction=0.5)
  idents, notes = generator.make_identities(spec)
  assert len({i.as_tuple() for i in idents}) == len(idents)
  similar = [(i, n) for i, n in enumerate(notes) if n["similar_to"]]
  assert len(similar) >= 10
  for i, n in similar:
    j = n["similar_to"] - 1
    assert (j < 30) == (i < 30)  # within the same split
    diff = [f.name for f in dataclasses.fields(render.Identity)
            if getattr(idents[i], f.name) != getattr(idents[j], f.name)]
    assert diff == [n["differs_in"]]


# ----------------------------------------------------------------------------- layouts


def test_mars_layout_files_and_mat_tables(tmp_path):
  root = str(tmp_path / "mars")
  summary = generator.generate(root, **TINY)
  info = os.path.join(root, "info")
  names = {s: open(os.path.join(info, f"{s}_name.txt")).read().split() for s in ("train", "test")}
  rows = {
      "train": scipy.io.loadmat(os.path.join(info, "tracks_train_info.mat"))["track_train_info"],
      "test": scipy.io.loadmat(os.path.join(info, "tracks_test_info.mat"))["track_test_info"],
  }
  query = scipy.io.loadmat(os.path.join(info, "query_IDX.mat"))["query_IDX"].reshape(-1)
  for split, home in (("train", "bbox_train"), ("test", "bbox_test")):
    r = rows[split]
    assert r.shape[1] == 4
    # 1-based inclusive ranges that tile the name file in order.
    assert r[0, 0] == 1 and r[-1, 1] == len(names[split])
    np.testing.assert_array_equal(r[1:, 0], r[:-1, 1] + 1)
    for start, end, pid, cam in r:
      tn = names[split][start - 1:end]
      assert {n[:4] for n in tn} == {layouts.pid4(pid)}
      assert {n[5] for n in tn} == {str(cam)} and 1 <= cam <= TINY["num_cameras"]
      assert [int(n[-7:-4]) for n in tn] == list(range(1, len(tn) + 1))
      for n in tn:
        assert os.path.getsize(os.path.join(root, home, n[:4], n)) > 0
  train_pids = set(rows["train"][:, 2])
  test_pids = set(rows["test"][:, 2])
  assert not train_pids & test_pids and min(train_pids) >= 1
  assert {0, -1} <= test_pids
  # Queries: 1-based rows of the test table, real people, each with a cross-camera match in
  # the official gallery (test rows but pid -1, queries included).
  test = rows["test"]
  assert query.min() >= 1 and query.max() <= len(test) and len(set(query)) == len(query)
  gallery = test[test[:, 2] != -1]
  for q in query:
    pid, cam = test[q - 1, 2], test[q - 1, 3]
    assert pid > 0
    assert ((gallery[:, 2] == pid) & (gallery[:, 3] != cam)).any()
  # One query per (test id, camera), as MARS.
  pairs = {(p, c) for _, _, p, c in test if p > 0}
  assert len(query) == len(pairs)
  # The summary counts what these tables say.
  s = summary["splits"]
  assert s["train"]["tracklets"] == len(rows["train"])
  assert s["train"]["frames"] == len(names["train"])
  assert s["query"]["tracklets"] == len(query)
  assert s["gallery"]["tracklets"] == len(gallery)
  assert s["train"]["ids"] == TINY["num_train_ids"]
  assert s["query"]["ids"] == TINY["num_test_ids"]
  assert s["gallery"]["ids"] == TINY["num_test_ids"] + 1  # + pid 0


def test_sidecar_matches_the_files(tmp_path):
  root = str(tmp_path / "mars")
  generator.generate(root, **TINY)
  meta = synthetic.load_meta(root)
  assert meta["flags"] == list(generator.FLAGS)
  by_first = synthetic.meta_by_first_frame(meta)
  assert len(by_first) == len(meta["tracklets"])
  for e in meta["tracklets"]:
    n = len(e["frames"])
    for f in generator.FLAGS:
      assert len(e[f]) == n and set(e[f]) <= {0, 1}
      assert (f in e["distractors"]) == any(e[f])
    name = os.path.basename(e["frames"][0])
    assert name[:4] == layouts.pid4(e["pid"]) and int(name[5]) == e["camid"] + 1
    assert all(os.path.isfile(os.path.join(root, p)) for p in e["frames"])
    if e["kind"] != "person":
      assert not e["distractors"]
    assert e["split"] in ("train", "test")
    assert (e["other_pid"] is not None) == any(e["other_person"])
  assert any(e["distractors"] for e in meta["tracklets"])
  assert any(not e["distractors"] and e["kind"] == "person" for e in meta["tracklets"])


def test_dukev_layout(tmp_path):
  root = str(tmp_path / "duke")
  summary = generator.generate(root, layout="dukev", **TINY)
  assert sorted(os.listdir(root)) == ["gallery", "query", "spec.json", "synthetic_meta.json",
                                      "train"]
  tracks = {}
  for part in ("train", "query", "gallery"):
    for pid in os.listdir(os.path.join(root, part)):
      for tnum in os.listdir(os.path.join(root, part, pid)):
        names = sorted(os.listdir(os.path.join(root, part, pid, tnum)))
        assert all(n.startswith(f"{pid}_C") and n[6].isdigit() for n in names)
        assert len({n[6] for n in names}) == 1
        assert [int(n.split("_F")[1][:4]) for n in names] == list(range(1, len(names) + 1))
        tracks[(part, pid, tnum)] = int(names[0][6])
  query = [(k, c) for k, c in tracks.items() if k[0] == "query"]
  gallery = {k[1:]: c for k, c in tracks.items() if k[0] == "gallery"}
  assert len(query) == TINY["num_test_ids"]  # one query per test id, as DukeV
  for (_, pid, tnum), cam in query:
    assert gallery[(pid, tnum)] == cam  # the gallery holds each query tracklet
    assert any(p == pid and c != cam for (p, _), c in gallery.items())
  assert "00-1" not in {k[1] for k in tracks}  # no junk in DukeV
  s = summary["splits"]
  assert s["query"]["tracklets"] == len(query)
  assert s["gallery"]["tracklets"] == len(gallery)
  assert s["train"]["tracklets"] == sum(k[0] == "train" for k in tracks)


def test_real_readers_load_the_layouts(tmp_path):
  readers = pytest.importorskip("data_pipelines.readers")
  for layout in ("mars", "dukev"):
    root = str(tmp_path / layout)
    summary = generator.generate(root, layout=layout, **TINY)
    split = readers.read_dataset(layout, root)
    assert split.summary()["splits"] == summary["splits"]
    assert split.summary()["queries_without_match"] == 0
    assert split.num_train_pids == TINY["num_train_ids"]
    # Every reader tracklet finds its sidecar entry (frames, camera, raw test pid).
    for part in ("train", "query", "gallery"):
      tracks = split.part(part)
      for t, e in zip(tracks, synthetic.meta_for(root, tracks)):
        assert e is not None and len(e["frames"]) == t.num_frames and e["camid"] == t.camid
        if part != "train":
          assert e["pid"] == t.pid and (part == "gallery" or e["query"])
  # Through the config, as the engine reads it (generated on first use).
  from configs import synthetic as cfg  # pylint: disable=g-import-not-at-top

  config = cfg.get_config("smoke")
  config.dataset.root = str(tmp_path / "from_config")
  config.dataset.synthetic.update(TINY)
  split = readers.read_from_config(config.dataset)
  rec = generator.read_spec(config.dataset.root)
  assert split.summary()["splits"] == rec["summary"]["splits"]


# ----------------------------------------------------------------------------- reuse


def test_ensure_generated_reuses_and_regenerates(tmp_path, monkeypatch):
  root = str(tmp_path / "syn")
  assert synthetic.ensure_generated(root, TINY) == os.path.abspath(root)
  spec_path = os.path.join(root, "spec.json")
  first = json.load(open(spec_path))
  assert first["knobs"] == dataclasses.asdict(make_spec(TINY))
  # Same knobs: nothing is rendered again.
  calls = []
  real = generator.generate
  monkeypatch.setattr(generator, "generate", lambda *a, **k: calls.append(a) or real(*a, **k))
  synthetic.ensure_generated(root, dict(TINY))
  assert calls == []
  # A changed knob: regenerated in place, no temp folders left behind.
  synthetic.ensure_generated(root, dict(TINY, num_train_ids=5))
  assert len(calls) == 1
  assert json.load(open(spec_path))["knobs"]["num_train_ids"] == 5
  assert sorted(os.listdir(tmp_path)) == ["syn"]
  # An interrupted generation leaves the previous dataset untouched and no temp folder.
  def boom(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(generator, "render_tracklet", boom)
  with pytest.raises(KeyboardInterrupt):
    synthetic.ensure_generated(root, dict(TINY, num_train_ids=6))
  assert json.load(open(spec_path))["knobs"]["num_train_ids"] == 5
  assert sorted(os.listdir(tmp_path)) == ["syn"]
  # A folder that is not a synthetic dataset is never overwritten.
  other = tmp_path / "mine"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not a synthetic dataset"):
    synthetic.ensure_generated(str(other), TINY)
  assert (other / "keep.txt").read_text() == "x"


def test_cli(tmp_path, capsys):
  out = str(tmp_path / "cli")
  args = [f"--out={out}", "--layout=dukev"] + [f"--{k}={v}" for k, v in TINY.items()]
  assert cli.main(args) == 0
  text = capsys.readouterr().out
  rec = generator.read_spec(out)
  assert rec["knobs"]["layout"] == "dukev"
  s = rec["summary"]["splits"]
  assert f"{s['train']['ids']:>5} {s['train']['tracklets']:>10} {s['train']['frames']:>8}" in text
  assert "seconds:" in text
  assert cli.main(args + ["--json"]) == 0  # reused
  printed = json.loads(capsys.readouterr().out)
  assert printed["reused"] and printed["splits"] == s
  assert cli.main([f"--out={out}", "--occlusion_porb=1"]) == 2
  assert "'occlusion_porb'" in capsys.readouterr().err
