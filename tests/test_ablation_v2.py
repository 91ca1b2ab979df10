"""benchmarks/ablation_v2 (issue 17): the whole protocol at toy size, resume, the statistics."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as sps

from benchmarks import ablation
from benchmarks import ablation_v2 as v2
from benchmarks import ablation_v2_stats as st

ARGS = ["--size=toy", "--families=all", "--variants=baseline,stmn", "--seeds=0,1",
        "--no_figures"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, fast_compiles):
  """One toy table: pretraining, 2 variants x 1 family x 2 seeds, the section in a RESULTS.md
  (with the persistent compilation cache of the workdir, restored afterwards)."""
  del fast_compiles
  import jax  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("ablation_v2")
  md = root / "RESULTS.md"
  md.write_text("# Results\n\n## v1\n\nold table\n")
  old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                         "jax_persistent_cache_min_compile_time_secs",
                                         "jax_persistent_cache_min_entry_size_bytes")}
  argv = [*ARGS, f"--workdir={root / 'w'}", f"--results_md={md}"]
  try:
    assert ablation.main(["--protocol=v2", *argv]) == 0
    yield root / "w", md, argv
  finally:
    for k, v in old.items():
      jax.config.update(k, v)


def test_every_run_finished_with_results_and_statistics(toy):
  w, _, _ = toy
  p = v2.PROTOCOLS["toy"]
  for variant in ("baseline", "stmn"):
    for seed in (0, 1):
      run = v2.Run("all", variant, seed)
      res = json.loads((w / "all" / variant / f"seed{seed}" / "result.json").read_text())
      assert (res["family"], res["variant"], res["seed"]) == ("all", variant, seed)
      assert 0.0 <= res["test"]["mAP"] <= 1.0 and res["num_query"] > 0
      log = json.loads((w / "all" / variant / f"seed{seed}" / "memory_stats.json").read_text())
      assert [r["step"] for r in log["records"]] == [0, *p.stats_steps] == [0, 2, 4]
      ckpts = sorted(x.name for x in (w / "all" / variant / f"seed{seed}" / "checkpoints").iterdir()
                     if x.name.isdigit())
      assert ckpts == ["4"]  # intermediate checkpoints deleted once their statistics are logged
      final = res["memory_final"]
      if variant == "stmn":
        assert 0.0 < final["spatial_entropy"] <= 1.0 and 0.0 < final["temporal_entropy"] <= 1.0
        assert final["readout_ratio"] >= 0.0
        assert final["weight_contrast"] is None or abs(final["weight_contrast"]) <= p.seq_len
      else:  # the baseline has no memory: nothing to log
        assert final["spatial_entropy"] is None and final["readout_ratio"] is None
      assert run.workdir(str(w)).endswith(os.path.join("all", variant, f"seed{seed}"))


def test_pretrained_trunk_is_a_torchvision_file_every_run_loads(toy):
  w, _, _ = toy
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from stmn_jax import models  # pylint: disable=g-import-not-at-top

  path = w / "pretrained" / "trunk.npz"
  with np.load(path, allow_pickle=False) as f:
    sd = {k: f[k] for k in f.files}
  assert "conv1.weight" in sd and "layer4.0.conv1.weight" in sd and "layer3.1.bn2.running_var" in sd
  config = v2.run_config(v2.PROTOCOLS["toy"], v2.Run("all", "stmn", 0), str(w), str(path))
  model = models.create_model(config, 8, nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(model.trunk.conv1.kernel.get_value()),
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  for stage in (model.value_stage, model.spatial_query_stage, model.temporal_query_stage):
    np.testing.assert_array_equal(np.asarray(stage.blocks[0].conv1.kernel.get_value()),
                                  sd["layer4.0.conv1.weight"].transpose(2, 3, 1, 0))
  assert v2.pretrain(v2.PROTOCOLS["toy"], str(w)) == str(path)  # cached: no second pretraining
  other = dataclasses.replace(v2.PROTOCOLS["toy"], pretrain_steps=6)
  with pytest.raises(ValueError, match="another recipe"):
    v2.pretrain(other, str(w))


def test_table_section_and_figures(toy):
  w, md, _ = toy
  text = md.read_text()
  assert text.startswith("# Results\n\n" + v2.BEGIN) and "## v1\n\nold table" in text
  section = text[text.index(v2.BEGIN):text.index(v2.END)]
  assert "| `baseline` |" in section and "| `stmn` - `baseline` |" in section
  assert "4 of 4 runs finished" in section
  summary = json.loads((w / "results" / "summary.json").read_text())
  assert len(summary["runs"]) == 4
  png = w / "results" / "memory_all.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_runs(toy, monkeypatch):
  w, md, argv = toy
  from stmn_jax import train  # pylint: disable=g-import-not-at-top

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  before = {p: p.stat().st_mtime_ns for p in w.glob("all/*/seed*/result.json")}
  assert v2.main([*argv, "--jax_cache="]) == 0
  assert {p: p.stat().st_mtime_ns for p in w.glob("all/*/seed*/result.json")} == before
  plan = v2.plan_text(v2.PROTOCOLS["toy"], v2.plan_runs(["all"], ["baseline", "stmn"], [0, 1, 2]),
                      str(w), {"step_s": {"baseline": 1.0, "stmn": 2.0}, "eval_s": 3.0,
                               "stats_s": 0.5, "overhead_s": 1.0, "pretrain_step_s": 1.0,
                               "data_s": 10.0})
  assert plan.count(" done ") == 4 and plan.count(" todo ") == 2
  # Two runs left, pretraining cached; data_s counts each family of the runs left (an upper bound).
  p = v2.PROTOCOLS["toy"]
  n = len(p.stats_steps) + 1  # statistics passes: step 0 and every interval
  per = {"baseline": p.steps * 1.0 + 3.0 + 1.0 + n * 0.5, "stmn": p.steps * 2.0 + 3.0 + 1.0 + n * 0.5}
  assert f"total {(per['baseline'] + per['stmn'] + 10.0) / 3600:.2f} h" in plan


def test_t_interval_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  a, b = rng.normal(40, 3, 7), rng.normal(38, 3, 7)
  c = st.t_interval(a - b)
  direct = sps.ttest_1samp(a - b, 0.0).confidence_interval(0.95)
  assert math.isclose(c["lo"], direct.low, rel_tol=1e-9)
  assert math.isclose(c["hi"], direct.high, rel_tol=1e-9)
  assert c["n"] == 7 and math.isclose(c["mean"], float(np.mean(a - b)))
  assert math.isnan(st.t_interval([1.0])["half"]) and st.t_interval([])["n"] == 0
  records = [{"family": "all", "variant": v, "seed": s, "test": {"mAP": x / 100}}
             for v, xs in (("stmn", a), ("baseline", b)) for s, x in enumerate(xs)]
  d = st.paired(records[:-1], "all", "stmn", "baseline")  # seed 6 of the baseline missing
  assert d["seeds"] == list(range(6))
  np.testing.assert_allclose(d["diffs"], (a - b)[:6])


def test_required_seeds_is_the_smallest_n_that_resolves_delta():
  for sd in (1.0, 1.6, 5.0):
    n = st.required_seeds(sd, delta=2.0, power=0.8)
    ok = lambda k: (sps.t.ppf(0.975, k - 1) + sps.t.ppf(0.8, k - 1)) * sd / math.sqrt(k) <= 2
    assert ok(n) and (n == 2 or not ok(n - 1))
  assert st.required_seeds(5.0) > st.required_seeds(1.6) > st.required_seeds(1.0, power=None)


def test_settle_step():
  steps = [25, 50, 75, 100]
  assert st.settle_step(steps, [1.0, 0.5, 0.31, 0.3], 0.02) == 75
  assert st.settled(steps, [1.0, 0.5, 0.31, 0.3], 0.02, 0.3) is False
  assert st.settled(steps, [0.3, 0.3, 0.31, 0.3], 0.02, 0.3) is True
  assert st.settled(steps, [None] * 4, 0.02, 0.3) is None
  assert v2.Protocol(steps=200, stats_every=25).stats_steps == list(range(25, 201, 25))
  with pytest.raises(ValueError, match="multiple"):
    v2.Protocol(steps=200, stats_every=30)


def test_families_switch_one_group_and_pretraining_ids_are_disjoint():
  p = v2.PROTOCOLS["full"]
  k = {f: v2.family_knobs(p, f) for f in v2.FAMILIES}
  assert k["clutter"]["clutter_strength"] > 0 and k["clutter"]["occlusion_prob"] == 0
  assert k["temporal"]["clutter_density"] == 0 and k["temporal"]["intruder_prob"] > 0
  assert k["none"]["clutter_strength"] == 0 and k["none"]["misalign_prob"] == 0
  same = {n for n in k["all"] if all(k[f][n] == k["all"][n] for f in v2.FAMILIES)}
  assert {"seed", "num_train_ids", "num_test_ids", "illumination_strength"} <= same
  assert (k["all"]["height"], k["all"]["width"]) == (p.height, p.width)
  pre = v2.pretrain_knobs(p)
  assert pre["seed"] != k["all"]["seed"] and pre["num_train_ids"] > k["all"]["num_train_ids"]
  assert v2.check_disjoint(pre, k["all"]) == p.pretrain_ids + p.pretrain_test_ids + 160
  with pytest.raises(ValueError, match="share"):
    v2.check_disjoint(k["all"], k["none"])


def test_figures_dir_copies_the_figures_and_the_section_shows_them(tmp_path):
  """--figures_dir: the figures are copied out of the workdir and the section embeds the memory
  statistics and links the paper figures, by paths relative to --results_md."""
  import argparse  # pylint: disable=g-import-not-at-top

  from benchmarks import ablation_v2_report as rep  # pylint: disable=g-import-not-at-top

  work = tmp_path / "w" / "results"
  (work / "figures" / "clutter").mkdir(parents=True)
  (work / "memory_clutter.png").write_bytes(b"m")
  (work / "figures" / "clutter" / "norm_change.png").write_bytes(b"n")
  figs = {"memory_clutter": str(work / "memory_clutter.png"),
          "paper_clutter": {"norm_change": str(work / "figures" / "clutter" / "norm_change.png")},
          "paper_temporal": {}}
  dest = tmp_path / "docs" / "figures" / "v2"
  copied = rep.copy_figures(figs, str(dest))
  assert (dest / "memory_clutter.png").read_bytes() == b"m"
  assert (dest / "clutter" / "norm_change.png").read_bytes() == b"n"
  assert copied["paper_temporal"] == {}
  a = argparse.Namespace(results_md=str(tmp_path / "docs" / "RESULTS.md"),
                         figures_dir=str(dest))
  lines = rep._figure_lines(copied, a)  # pylint: disable=protected-access
  assert "![memory_clutter](figures/v2/memory_clutter.png)" in lines
  assert any("[norm_change.png](figures/v2/clutter/norm_change.png)" in x for x in lines)
  a.figures_dir = ""
  assert rep._figure_lines(figs, a)[0].startswith("- `memory_clutter`: `")  # pylint: disable=protected-access


def test_memory_figure_legend_names_every_run(tmp_path, monkeypatch):
  """A run with lines in some panels only (tm: no spatial statistics) is still in the legend."""
  from benchmarks import ablation_v2_memory as mem  # pylint: disable=g-import-not-at-top
  from stmn_jax import figures  # pylint: disable=g-import-not-at-top

  drawn = {}
  monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
  recs = lambda **kw: [dict(step=s, **kw) for s in (0, 50)]  # pylint: disable=unnecessary-lambda-assignment
  series = {"sm": recs(spatial_entropy=0.9, readout_ratio=0.01),
            "tm": recs(temporal_entropy=0.9, weight_contrast=0.0),
            "stmn": recs(spatial_entropy=0.9, temporal_entropy=0.9, weight_contrast=0.0,
                         readout_ratio=0.01)}
  mem.stats_figure(str(tmp_path / "m.png"), series)
  legend = drawn["fig"].axes[-1].get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["sm", "tm", "stmn"]
