"""Model-selection options (`config.train.select_*`, `eval_*`; `stmn_jax/selection.py`), each
against a direct computation: the tie rule, the metric, the epochs evaluated, the sampling and
flip of the selection evaluator, training on every id, what results.json says, and resume.

The training runs use the tiny stub model on the tiny PNG split of `test_selection_resume`;
where only the choice matters, the evaluator is a scripted stand-in whose scores depend on the
step evaluated (so a resumed run sees the same scores).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stmn_jax import checkpoints
from stmn_jax import errors
from stmn_jax import evaluators
from stmn_jax import run_setup
from stmn_jax import selection
from stmn_jax import train
from tests import engine_stubs as stubs
from tests import test_selection_resume as tiny

pytestmark = pytest.mark.usefixtures("fast_compiles")

# Scripted scores at steps 2, 4, 6, 8: mAP is best at 4 and 6 (a tie), R1 at 2 and 8 (a tie).
SCRIPT = {2: (0.3, 0.7), 4: (0.5, 0.6), 6: (0.5, 0.4), 8: (0.4, 0.7)}  # step: (mAP, R1)


def _config(**train_fields):
  config = tiny._config()  # 4 epochs x 2 steps, 4 of 10 ids held out, evaluated every epoch
  config.data.check_frames = False
  for k, v in train_fields.items():
    config.train[k] = v
  return config


def _all_ids(config):
  config.dataset.num_val_ids = 0
  config.train.select_on = "test"
  return config


def _metrics(m_ap: float, r1: float) -> dict:
  cmc = np.asarray([r1] + [max(r1, 0.9)] * 19)
  return {"mAP": m_ap, "mINP": m_ap / 2, "R1": r1, "R5": cmc[4], "R10": cmc[9], "R20": cmc[19],
          "cmc": cmc, "num_valid_queries": 6, "num_queries_without_match": 0}


class _Scripted:
  """Evaluator stand-in: `SCRIPT`'s scores for the step of the state it scores; records
  (step, config.eval.sampling, config.eval.flip, number of queries) of every call in `calls`."""

  def __init__(self, calls, state, config, mesh):
    del state, mesh
    self.calls, self.eval = calls, config.eval

  def run(self, state, query, gallery):
    del gallery
    self.calls.append((state.step, self.eval.sampling, bool(self.eval.flip), len(query)))
    return _metrics(*SCRIPT.get(state.step, (0.0, 0.0)))


def _script_evaluators(monkeypatch) -> list:
  calls: list = []
  monkeypatch.setattr(evaluators, "from_config",
                      lambda state, config, mesh: _Scripted(calls, state, config, mesh))
  return calls


def _r1_last_config():
  return _config(select_metric="R1", select_ties="last")


def _train(config, workdir, root, **kw) -> dict:
  _, summary = train.train_and_evaluate(
      config, str(workdir), model_fn=stubs.tiny_model_fn, loss_fn=stubs.tiny_loss_fn,
      split=tiny._split(str(root)), **kw)
  return summary


def _best(history, metric, ties) -> int:
  """The direct computation: the step of the first (ties "first") or last maximum."""
  scores = [h["val"][metric] for h in history]
  order = range(len(scores)) if ties == "first" else reversed(range(len(scores)))
  return history[max(order, key=lambda i: scores[i])]["step"]


# ------------------------------------------------------------------------------ pure rules
@pytest.mark.parametrize("ties,expected", [("first", 1), ("last", 4)])
def test_tie_rule_on_a_score_sequence(ties, expected):
  scores = [0.5, 0.7, 0.7, 0.6, 0.7]
  direct = int(np.argmax(scores)) if ties == "first" else len(scores) - 1 - int(
      np.argmax(scores[::-1]))
  state = checkpoints.SelectionState()
  for i, s in enumerate(scores):
    if state.is_better({"mAP": s}, "mAP", ties):
      state.best_step, state.best_metrics = i, {"mAP": s}
  assert state.best_step == direct == expected


def test_r1_and_map_pick_different_evaluations():
  seq = [{"mAP": 0.5, "R1": 0.8}, {"mAP": 0.6, "R1": 0.7}, {"mAP": 0.55, "R1": 0.75}]
  for metric, direct in (("mAP", 1), ("R1", 0)):
    state = checkpoints.SelectionState()
    for i, m in enumerate(seq):
      if state.is_better(m, metric):
        state.best_step, state.best_metrics = i, m
    assert state.best_step == direct == int(np.argmax([m[metric] for m in seq]))


@pytest.mark.parametrize("epochs,every,offset,at_end,expected", [
    (20, 10, 1, False, [9, 19]),
    (20, 10, 2, False, [8, 18]),  # the official schedule at 20 epochs
    (20, 10, 0, True, [10, 20]),  # the default
    (25, 10, 0, True, [10, 20, 25]),  # the last epoch added
    (25, 10, 0, False, [10, 20]),
    # The official run: main.py's `for epoch in range(1, 201)` scores when (epoch + 1) % 10 == 0,
    # before training that epoch: after epoch - 1 completed epochs.
    (200, 10, 2, False, [e - 1 for e in range(1, 201) if (e + 1) % 10 == 0]),
])
def test_eval_epochs_schedule(epochs, every, offset, at_end, expected):
  config = _config(eval_every_epochs=every, eval_epoch_offset=offset, eval_at_end=at_end)
  config.optim.num_epochs = epochs
  direct = [e for e in range(1, epochs + 1) if (e + offset) % every == 0]
  direct += [epochs] if at_end and epochs not in direct else []
  assert selection.eval_epochs(config) == direct == expected
  assert selection.eval_steps(config, 3) == [3 * e for e in expected]


def test_selection_eval_config_overrides_only_sampling_and_flip():
  config = _config()
  assert (config.eval.sampling, config.eval.flip) == ("all_frames", True)
  same = selection.eval_config(config)
  assert (same.eval.sampling, same.eval.flip) == ("all_frames", True)
  assert selection.same_protocol(config)
  config.train.select_sampling, config.train.select_flip = "rrs", "off"
  sel = selection.eval_config(config)
  assert (sel.eval.sampling, sel.eval.flip) == ("rrs", False)
  assert (config.eval.sampling, config.eval.flip) == ("all_frames", True)  # the test's protocol
  assert sel.eval.distance == config.eval.distance and not selection.same_protocol(config)


@pytest.mark.parametrize("fields,message", [
    (dict(select_on="val", num_val_ids=0), r"select_on = 'val' needs validation ids"),
    (dict(select_on="none"), r"select_on = 'none' .*num_val_ids = 4"),
    (dict(select_metric="rank1"), r"config.train.select_metric = 'rank1'"),
    (dict(select_ties=">="), r"config.train.select_ties = '>='"),
    (dict(select_sampling="clip"), r"config.train.select_sampling = 'clip'"),
    (dict(select_flip=False), r"config.train.select_flip = False"),
    (dict(eval_epoch_offset=1, eval_every_epochs=1), r"eval_epoch_offset = 1: expected 0 \.\. "),
    (dict(eval_at_end="no"), r"config.train.eval_at_end = 'no': expected a bool"),
    # A selection that would score nothing (the final weights tested under a selection label).
    (dict(eval_every_epochs=10**6, eval_at_end=False), r"select_on = 'val' scores no epoch"),
])
def test_bad_selection_fields_fail_before_work(fields, message):
  config = _config()
  if "num_val_ids" in fields:
    config.dataset.num_val_ids = fields.pop("num_val_ids")
  with config.ignore_type():  # a wrongly typed override as a user could write it
    for k, v in fields.items():
      config.train[k] = v
  with pytest.raises(errors.ConfigError, match=message):
    run_setup.prepare_run(config, split=tiny._split("/nonexistent"), read_data=False)


def test_resume_refuses_changed_options():
  options = selection.options(_all_ids(_config()))
  selection.check_resumable(options, dict(options), "w/checkpoints/4")  # the same: fine
  with pytest.raises(errors.CheckpointError,
                     match=r"w/checkpoints/4 was selected with .*metric: 'mAP' -> 'R1'"):
    selection.check_resumable(options, dict(options, metric="R1"), "w/checkpoints/4")
  # An older version's checkpoint (no options recorded) selected by mAP, first of ties.
  selection.check_resumable(None, options, "w/checkpoints/4")
  with pytest.raises(errors.CheckpointError, match=r"ties: 'first' -> 'last'"):
    selection.check_resumable(None, dict(options, ties="last"), "w/checkpoints/4")


# ------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def r1_last(tmp_path_factory):
  """(data root, workdir, summary, evaluator calls) of an uninterrupted scripted run that
  selects by R1, ties to the later."""
  tmp = tmp_path_factory.mktemp("r1_last")
  with pytest.MonkeyPatch.context() as mp:
    calls = _script_evaluators(mp)
    summary = _train(_r1_last_config(), tmp / "w", tmp / "data")
  return tmp / "data", tmp / "w", summary, calls


def test_training_on_every_id_selects_on_test(tmp_path):
  config = _all_ids(_config())
  setup = run_setup.prepare_run(config, split=tiny._split(str(tmp_path / "data")))
  assert setup.num_classes == 10 == len({t.pid for t in setup.train_split.train})
  assert setup.selection == "test" and setup.selection_split is setup.test_split
  held_out = run_setup.prepare_run(_config(), split=tiny._split(str(tmp_path / "data")))
  assert held_out.num_classes == 6 and held_out.selection == "val"


@pytest.mark.parametrize("metric,ties", [("mAP", "first"), ("R1", "last")])
def test_metric_and_tie_rule_pick_the_direct_step(r1_last, tmp_path, monkeypatch, metric, ties):
  """mAP, first of ties: step 4; R1, last of ties: step 8 (the other two combinations pick 6
  and 2; the rules themselves are tested above)."""
  if (metric, ties) == ("R1", "last"):
    _, workdir, summary, calls = r1_last
  else:
    calls = _script_evaluators(monkeypatch)
    workdir = tmp_path / "w"
    summary = _train(_config(select_metric=metric, select_ties=ties), workdir,
                     tmp_path / "data")
  history = summary["history"]
  assert [h["step"] for h in history] == [2, 4, 6, 8]
  best = _best(history, metric, ties)
  assert best == {("mAP", "first"): 4, ("R1", "last"): 8}[(metric, ties)]
  assert summary["test_checkpoint"] == f"best by val {metric} (step {best})"
  assert calls[-1][0] == best  # the final test scored the selected checkpoint
  with checkpoints.Checkpointer(str(workdir), read_only=True) as ck:
    assert ck.best_steps() == [best]  # not orbax's best by mAP (step 4 or 6)


def test_official_selection_end_to_end(tmp_path, monkeypatch):
  """The official kind of selection: every id trains; R1 on the test set, ties to the later,
  RRS without flip, after epochs 1 and 3 of 4 only (never after the last): the evaluations,
  the evaluator configs and results.json say so."""
  built = []
  real = evaluators.from_config

  def recording(state, config, mesh):
    built.append((config.eval.sampling, bool(config.eval.flip)))
    return real(state, config, mesh)

  monkeypatch.setattr(evaluators, "from_config", recording)
  config = _all_ids(_config(select_metric="R1", select_ties="last", select_sampling="rrs",
                            select_flip="off", eval_every_epochs=2, eval_epoch_offset=1,
                            eval_at_end=False))
  workdir = tmp_path / "w"
  summary = _train(config, workdir, tmp_path / "data")
  assert built == [("all_frames", True), ("rrs", False)]  # the test's, then the selection's
  assert summary["num_classes"] == 10
  assert [h["step"] for h in summary["history"]] == [2, 6]  # after epochs 1 and 3, not 4
  scores = [h["test"]["R1"] for h in summary["history"]]
  best = 6 if scores[1] >= scores[0] else 2
  assert summary["test_checkpoint"] == f"best by test R1 (step {best})"
  with open(os.path.join(workdir, "results.json")) as f:
    written = json.load(f)
  assert written["model_selection"] == {
      "split": "test", "num_val_ids": 0, "metric": "R1", "ties": "last", "sampling": "rrs",
      "flip": False, "eval_every_epochs": 2, "eval_epoch_offset": 1, "eval_at_end": False,
      "eval_epochs": [1, 3], "eval_steps": [2, 6]}
  assert written["selection"] == "test" and "note" in written


def test_resume_with_options_is_exact_and_refuses_a_change(r1_last, tmp_path, monkeypatch):
  root, _, ref, _ = r1_last
  _script_evaluators(monkeypatch)
  config = _r1_last_config()
  stopped = _train(config, tmp_path / "w", root, max_steps=5)  # last checkpoint: step 4
  assert stopped["stopped_early"] and [h["step"] for h in stopped["history"]] == [2, 4]
  changed = _config(select_metric="mAP", select_ties="last")
  with pytest.raises(errors.CheckpointError, match=r"metric: 'R1' -> 'mAP'"):
    _train(changed, tmp_path / "w", root)
  got = _train(config, tmp_path / "w", root)
  for key in ("test_checkpoint", "history", "loss_history", "train", "model_selection"):
    assert tiny._json(got[key]) == tiny._json(ref[key]), key
  assert got["test_checkpoint"] == "best by val R1 (step 8)"
