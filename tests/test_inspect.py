"""`python -m data_pipelines.inspect`: table, --json, --verify, PRID --make-splits, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from data_pipelines import inspect as inspect_cli
from data_pipelines import readers
from data_pipelines.readers import ilidsvid, mars, prid2011
from tests.test_readers import write_ilids, write_mars, write_prid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_json_is_exactly_the_split_summary(tmp_path, capsys):
  root = write_mars(str(tmp_path / "MARS"))
  for protocol in ("official", "torchreid"):
    assert inspect_cli.main(["--dataset=mars", f"--root={root}", f"--protocol={protocol}",
                             "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == mars.read(root, protocol=protocol).summary()
    assert out.count("\n") == 1  # one JSON object on one line, nothing else


def test_table_shows_every_count(tmp_path, capsys):
  root = write_mars(str(tmp_path / "MARS"))
  assert inspect_cli.main(["--dataset", "mars", "--root", root, "--no-distractors"]) == 0
  out = capsys.readouterr().out
  summary = mars.read(root, distractors=False).summary()
  lines = out.splitlines()
  assert lines[0] == "dataset: mars"
  for part in ("train", "query", "gallery"):
    row = next(line for line in lines if line.startswith(part)).split()
    c = summary["splits"][part]
    assert row[1:] == [f"{c[k]:,}" for k in ("ids", "tracklets", "frames", "cameras")]
  assert lines[-1].endswith(f": {summary['queries_without_match']}")


def test_split_id_reaches_the_reader(tmp_path, capsys):
  root = write_ilids(str(tmp_path / "ilids"))
  outs = []
  for split_id in (0, 1):
    inspect_cli.main(["--dataset=ilidsvid", f"--root={root}", f"--split-id={split_id}", "--json"])
    outs.append(json.loads(capsys.readouterr().out))
    assert outs[-1] == ilidsvid.read(root, split_id=split_id).summary()
  assert outs[0]["dataset"] == "ilidsvid" and outs[0]["splits"]["gallery"]["cameras"] == 1
  assert inspect_cli.main(["--dataset=ilidsvid", f"--root={root}", "--split-id=2"]) == 2
  assert "split_id 2" in capsys.readouterr().err


def test_verify_and_errors_exit_2_with_the_path(tmp_path, capsys):
  root = write_mars(str(tmp_path / "MARS"))
  bad = os.path.join(root, "bbox_test", "0006")
  bad = os.path.join(bad, sorted(os.listdir(bad))[0])
  with open(bad, "wb") as f:
    f.write(b"garbage")
  assert inspect_cli.main(["--dataset=mars", f"--root={root}", "--json"]) == 0
  capsys.readouterr()
  assert inspect_cli.main(["--dataset=mars", f"--root={root}", "--verify"]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and bad in captured.err and "unreadable" in captured.err
  missing = str(tmp_path / "nothing")
  assert inspect_cli.main(["--dataset=mars", f"--root={missing}"]) == 2
  assert missing in capsys.readouterr().err


def test_prid_make_splits_through_the_module(tmp_path):
  root = write_prid(str(tmp_path / "prid2011"))
  cmd = [sys.executable, "-m", "data_pipelines.inspect", "--dataset=prid2011", f"--root={root}",
         "--json"]
  env = dict(os.environ, PYTHONPATH=REPO)
  first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert first.returncode == 2 and "--make-splits" in first.stderr
  made = subprocess.run(cmd + ["--make-splits", "5", "--min-frames", "2", "--split-id", "1"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert made.returncode == 0, made.stderr
  path = os.path.join(root, prid2011.SPLITS_FILE)
  assert json.loads(made.stdout) == prid2011.read(root, split_id=1).summary()
  splits = json.load(open(path))
  assert len(splits) == prid2011.DEFAULT_NUM_SPLITS
  eligible = prid2011.eligible_persons(root, 2)
  assert all(sorted(s["train"] + s["test"]) == eligible for s in splits)


def test_synthetic_reads_the_generated_layout(tmp_path, monkeypatch, capsys):
  import types  # pylint: disable=g-import-not-at-top

  seen = []

  def ensure_generated(root, knobs):
    seen.append(root)
    folder = os.path.join(root, "mars_layout")
    if not os.path.isdir(folder):
      write_mars(folder)
    return folder

  fake = types.ModuleType("data_pipelines.synthetic")
  fake.ensure_generated = ensure_generated
  monkeypatch.setattr(readers, "synthetic", fake)  # the generator the readers call
  root = str(tmp_path / "syn")
  assert inspect_cli.main(["--dataset=synthetic", f"--root={root}", "--protocol=torchreid",
                           "--json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  expected = mars.read(os.path.join(root, "mars_layout"), protocol="torchreid").summary()
  assert seen == [root]
  assert summary == dict(expected, dataset="synthetic")
