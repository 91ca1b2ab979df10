"""benchmarks/ablation.py: run plan, stage logic on fake runs, aggregation, table, markers."""

import json
import math
import os

import numpy as np
import pytest

from benchmarks import ablation
from stmn_jax import app


def _fake_test(rng):
  return {"R1": float(rng.random()), "R5": float(rng.random()), "mAP": float(rng.random()),
          "mINP": float(rng.random()), "R10": 0.5}


def test_plan_order_and_count():
  runs = ablation.plan_runs(ablation.MODELS, ablation.BENCHES, [0, 1, 2])
  assert len(runs) == len(set(runs)) == 9 * 2 * 3
  assert runs[:2] == [ablation.Run("distractors", "stmn", 0),
                      ablation.Run("distractors", "stmn_nospread", 0)]
  first_clean = next(i for i, r in enumerate(runs) if r.bench == "clean")
  assert all(r.bench == "clean" for r in runs[first_clean:])
  clean_models = [r.model for r in runs[first_clean:]]
  assert clean_models[:12] == [m for m in ("baseline", "sm", "tm", "stmn") for _ in range(3)]
  # A subset keeps only what was asked for.
  sub = ablation.plan_runs(["baseline"], ["clean"], [3])
  assert sub == [ablation.Run("clean", "baseline", 3)]


def test_clean_knobs_turn_every_distractor_off_and_keep_the_rest():
  from data_pipelines.synthetic import spec

  dirty, clean = ablation.bench_knobs("distractors"), ablation.bench_knobs("clean")
  assert dirty == ablation.bench_knobs("distractors")
  for d in spec.TEMPORAL_DISTRACTORS:
    assert dirty[f"{d}_prob"] > 0 and clean[f"{d}_prob"] == 0
  for k in ("clutter_strength", "clutter_density", "illumination_strength"):
    assert dirty[k] > 0 and clean[k] == 0
  same = {k for k in dirty if dirty[k] == clean[k]}
  assert set(dirty) - same == set(ablation.CLEAN_KNOBS)
  spec.make_spec(clean)  # valid knobs
  assert (dirty["height"], dirty["width"]) == (64, 32)


def test_commands_are_valid_main_flags(tmp_path):
  for bench in ablation.BENCHES:
    run = ablation.Run(bench, "sm_nospread", 2)
    for cmd in (ablation.train_command(run, str(tmp_path)),
                ablation.eval_command(run, str(tmp_path))):
      assert cmd[:2] == ["python", "main.py"]
      argv = cmd[1:]
      config_arg = next(a for a in argv if a.startswith("--config="))[len("--config="):]
      cwd = os.getcwd()
      os.chdir(ablation.REPO)
      try:
        app.check_config_overrides(argv, config_arg)  # raises on an unknown key
        config = app.load_config_file(config_arg)
      finally:
        os.chdir(cwd)
      assert config.model.preset == "sm_nospread" and config.loss.spread_weight == 0
      assert f"--workdir={tmp_path}/{bench}/sm_nospread/seed2" in cmd
      assert "--config.seed=2" in cmd
  assert "--mode=eval" in ablation.eval_command(run, "w")
  assert "--config.eval.sampling=all_frames" in ablation.eval_command(run, "w")
  assert "--config.eval.sampling=rrs" in ablation.train_command(run, "w")


def test_env_shares_cache_and_limits_threads():
  env = ablation.subprocess_env("/tmp/x", jobs=2)
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/tmp/x/jax_cache"
  assert "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
  assert "device_count" not in env["XLA_FLAGS"]  # conftest's fake devices are not inherited
  assert "multi_thread" not in ablation.subprocess_env("/tmp/x", jobs=1)["XLA_FLAGS"]


def _fake_stage(calls, rng):
  """Replaces ablation._stage: writes what main.py's train / eval modes would write."""

  def stage(cmd, log_path, env):
    del env
    calls.append(cmd)
    w = next(a for a in cmd if a.startswith("--workdir="))[len("--workdir="):]
    if "--mode=eval" in cmd:
      summary = {"mode": "eval", "test": _fake_test(rng)}
    else:
      os.makedirs(os.path.join(w, "checkpoints"), exist_ok=True)
      os.makedirs(os.path.join(w, "best", "7"), exist_ok=True)
      summary = {"selection": "val", "history": [], "test": _fake_test(rng)}
    with open(os.path.join(w, "results.json"), "w") as f:
      json.dump(summary, f)
    with open(log_path, "a") as f:
      f.write("ok\n")
    return {"command": " ".join(cmd), "seconds": 2.0, "loadavg_before": [1.0, 1, 1],
            "loadavg_after": [3.0, 1, 1], "started": 100.0 + len(calls),
            "ended": 102.0 + len(calls)}

  return stage


def test_run_one_stages_copies_and_resumes(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(ablation, "_stage", _fake_stage(calls, np.random.default_rng(0)))
  run = ablation.Run("distractors", "tm", 1)
  w = run.workdir(str(tmp_path))
  ablation.run_one(run, str(tmp_path), {}, keep_all=False)
  assert len(calls) == 2 and "--mode=eval" in calls[1]
  rrs = json.load(open(os.path.join(w, "results_rrs.json")))
  full = json.load(open(os.path.join(w, "results_all_frames.json")))
  assert rrs["selection"] == "val" and full["mode"] == "eval" and rrs["test"] != full["test"]
  assert json.load(open(os.path.join(w, "results.json"))) == rrs  # training summary restored
  assert not os.path.exists(os.path.join(w, "checkpoints"))
  assert os.path.isdir(os.path.join(w, "best"))
  record = json.load(open(os.path.join(w, "ablation_run.json")))
  assert record["done"] and record["train"]["seconds"] == 2.0
  # Finished: nothing runs again.
  ablation.run_one(run, str(tmp_path), {}, keep_all=False)
  assert len(calls) == 2
  # Killed during the all-frames evaluation: only that stage runs again.
  os.remove(os.path.join(w, "results_all_frames.json"))
  ablation.run_one(run, str(tmp_path), {}, keep_all=False)
  assert len(calls) == 3 and "--mode=eval" in calls[2]
  # Without a best checkpoint (no validation ids) the final one is the model: it stays.
  empty = ablation.Run("clean", "tm", 0)
  ew = empty.workdir(str(tmp_path))
  os.makedirs(os.path.join(ew, "best"))
  os.makedirs(os.path.join(ew, "checkpoints", "105"))
  with open(os.path.join(ew, "results.json"), "w") as f:
    json.dump({"selection": None, "test": _fake_test(np.random.default_rng(2))}, f)
  ablation.run_one(empty, str(tmp_path), {}, keep_all=False)
  assert os.path.isdir(os.path.join(ew, "checkpoints", "105"))
  # A kept run keeps its checkpoints.
  keep = ablation.Run("distractors", "stmn", 0)
  ablation.run_one(keep, str(tmp_path), {}, keep_all=True)
  assert os.path.isdir(os.path.join(keep.workdir(str(tmp_path)), "checkpoints"))


def test_run_one_refuses_an_eval_summary_as_training_results(tmp_path):
  run = ablation.Run("clean", "baseline", 0)
  w = run.workdir(str(tmp_path))
  os.makedirs(w)
  with open(os.path.join(w, "results.json"), "w") as f:
    json.dump({"mode": "eval", "test": {}}, f)
  with pytest.raises(RuntimeError, match="no training summary"):
    ablation.run_one(run, str(tmp_path), {}, keep_all=False)


def test_mean_std_is_sample_std():
  vals = [3.0, 5.5, 10.25]
  mean, std = ablation.mean_std(vals)
  assert mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals, ddof=1))
  assert ablation.mean_std([2.0])[0] == 2.0 and math.isnan(ablation.mean_std([2.0])[1])
  assert math.isnan(ablation.mean_std([])[0])


def test_aggregate_table_and_markers(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(ablation, "_stage", _fake_stage(calls, np.random.default_rng(1)))
  models, benches, seeds = ["baseline", "stmn"], ["distractors", "clean"], [0, 1, 2]
  for r in ablation.plan_runs(models, benches, seeds):
    if r != ablation.Run("clean", "stmn", 2):  # one missing run: n = 2 for that row
      ablation.run_one(r, str(tmp_path), {}, keep_all=False)
  records = ablation.collect(str(tmp_path), models, benches, seeds)
  assert len(records) == 11
  table = ablation.aggregate(records)
  for bench in benches:
    for model in models:
      n = 2 if (bench, model) == ("clean", "stmn") else 3
      row = table[bench][model]
      assert row["n"] == n and row["seconds_mean"] == pytest.approx(4.0)
      for s in ablation.SAMPLINGS:
        vals = [100 * json.load(open(os.path.join(
            ablation.Run(bench, model, k).workdir(str(tmp_path)), f"results_{s}.json")))
            ["test"]["mAP"] for k in seeds[:n]]
        assert row[s]["mAP"]["mean"] == pytest.approx(np.mean(vals))
        assert row[s]["mAP"]["std"] == pytest.approx(np.std(vals, ddof=1))
  md = ablation.markdown_table(table, "distractors", models)
  lines = md.splitlines()
  assert len(lines) == 4 and lines[2].startswith("| `baseline` | 3 |")
  cell = table["distractors"]["stmn"]["all_frames"]["mINP"]
  assert f"{cell['mean']:.1f} ± {cell['std']:.1f}" in lines[3].split(" | ")[-2]

  diff = ablation.paired_differences(
      records, "all_frames", "mAP", [(("clean", "stmn"), ("clean", "baseline"))])[0]
  assert diff["seeds"] == [0, 1]
  direct = [table["clean"]["stmn"]["all_frames"]["mAP"]["values"][k]
            - table["clean"]["baseline"]["all_frames"]["mAP"]["values"][k] for k in (0, 1)]
  assert diff["mean"] == pytest.approx(np.mean(direct))
  assert diff["std"] == pytest.approx(np.std(direct, ddof=1))
  dt = ablation.difference_table(records, models, benches)
  assert f"{diff['mean']:.1f} ± {diff['std']:.1f} (n=2)" in dt
  assert "`stmn`: distractors - clean" in dt
  assert "`stmn` - `sm`" not in dt  # sm was not run
  full = ablation.difference_table(
      [dict(r, model="stmn_nospread") for r in records if r["model"] == "stmn"] + records,
      ["baseline", "stmn_nospread", "stmn"], benches)
  assert "distractors: `stmn` - `stmn_nospread` | 0.0 ± 0.0 (n=3)" in full

  body = ablation.render(records, models, benches, seeds, "workdir/ablation", "abc123", 1)
  assert "abc123" in body and "the sum over the 11 runs is 44 s" in body
  # stages start at 100 + i and end at 102 + i for the i-th call (1..22): 124 - 101 = 23 s
  assert "23 s from the first start to the last end" in body
  assert "--config.seed=<k>" in body and "seed<k>" in body
  path = tmp_path / "RESULTS.md"
  ablation.write_markers(str(path), "OLD-BODY")
  path.write_text("# R\n\nmy text\n" + path.read_text().split("\n", 2)[2] + "\n## Figures\nx\n")
  ablation.write_markers(str(path), body)
  text = path.read_text()
  assert text.startswith("# R\n\nmy text\n") and text.endswith("## Figures\nx\n")
  assert "OLD-BODY" not in text and text.count(ablation.BEGIN) == 1 and body in text
  (tmp_path / "bad.md").write_text(ablation.END + "\n" + ablation.BEGIN)
  with pytest.raises(ValueError, match="markers"):
    ablation.write_markers(str(tmp_path / "bad.md"), body)


def test_cli_dry_run_prints_every_run(capsys):
  assert ablation.main(["--dry-run", "--seeds=0,1", "--models=baseline,sta",
                        "--benches=clean"]) == 0
  out = capsys.readouterr().out
  assert out.count("python main.py --mode=eval") == 4
  assert out.count("clutter_density=0.0") == 8
  with pytest.raises(SystemExit, match="--models"):
    ablation.main(["--dry-run", "--models=nope"])


def test_ablation_word_only_for_the_synthetic_config():
  from configs import mars, synthetic

  c = synthetic.get_config("tm,ablation")
  base = synthetic.get_config("tm")
  assert (c.model.width, c.dataset.num_val_ids, c.optim.learning_rate) == (0.125, 0, 3e-3)
  assert c.model.temporal_memory and not c.model.spatial_memory
  assert c.dataset.root != base.dataset.root  # its own benchmark folder
  with pytest.raises(ValueError, match="ablation"):
    mars.get_config("ablation")
