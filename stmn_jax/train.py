"""The training loop: data in, the jitted step, logging, checkpoints, model selection, test.

`train_and_evaluate(config, workdir)` trains (resuming from the newest checkpoint), selects the
best checkpoint as `config.train`'s selection options say (`stmn_jax/selection.py`: split,
metric, tie rule, the epochs evaluated, and the sampling / flip of the selection evaluator,
built by `evaluators`), tests it under `config.eval`'s protocol, and writes `results.json`
(which names the selection used). The step itself is `train_state.make_train_step` (TF- and
clu-free).

Resume is exact: a checkpoint holds model, optimizer, step and key, and the selection state
(evaluations done, the best step and score, the validation and loss histories,
`checkpoints.SelectionState`), committed together; the data position comes from
`pipeline.train_iterator(start_step=step)`, which yields exactly the batches an uninterrupted
run sees from that step on. A run killed at any moment and started again ends with the same
selected checkpoint, test results and histories as an uninterrupted one (`checkpoints.py` has
the save order this relies on). A resumed run refuses selection options other than those its
checkpoint was selected with (`selection.check_resumable`): that would mix two selections. A
failed background save stops the run after the current step with a
`checkpoints.CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.sharding import Mesh

from data_pipelines import pipeline
from stmn_jax import checkpoints as ckpt_lib
from stmn_jax import errors
from stmn_jax import evaluators
from stmn_jax import ranking
from stmn_jax import results as results_lib
from stmn_jax import run_setup
from stmn_jax import selection as selection_lib
from stmn_jax import sharding
from stmn_jax import train_state as train_state_lib
from stmn_jax import workdir_io


def _fetch_and_check(pending: list[tuple[int, Any]]) -> list[tuple[int, dict]]:
  """Device metrics -> floats; raises NonFiniteLossError (a FloatingPointError) at the first
  non-finite step."""
  out = []
  for step, metrics in jax.device_get(pending):
    metrics = {k: float(v) for k, v in metrics.items()}
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])]
    if bad:
      raise errors.NonFiniteLossError(
          f"non-finite {', '.join(bad)} at step {step}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
      )
    out.append((step, metrics))
  pending.clear()
  return out


# ------------------------------------------------------------------------------ main loop
def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model_fn: train_state_lib.ModelFn | None = None,
    loss_fn: train_state_lib.LossFn | None = None,
    mesh: Mesh | None = None,
    split=None,
    max_steps: int | None = None,
) -> tuple[train_state_lib.TrainState, dict]:
  """Trains (resuming from the newest checkpoint), evaluates, writes `results.json`.

  `model_fn` / `loss_fn` / `split` replace the registry model, `losses.total_loss` and
  `get_split(config.dataset)` (tests, notebooks). `max_steps` stops after that many completed
  steps as a killed run would: no extra checkpoint, no final evaluation. Returns the state and a
  summary dict (what results.json holds).
  """
  setup = run_setup.prepare_run(config, mesh=mesh, split=split)
  mesh = setup.mesh
  workdir_io.workdir_path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
  train_split, sel_split, test_split = setup.train_split, setup.selection_split, setup.test_split
  sel_label, num_classes, spe = setup.selection, setup.num_classes, setup.steps_per_epoch
  total_steps = config.optim.num_epochs * spe
  eval_steps = set(selection_lib.eval_steps(config, spe)) if sel_split is not None else set()
  batch_size = config.data.num_ids_per_batch * config.data.num_tracklets_per_id
  t = config.train
  logging.info(
      "train: %d ids, %d tracklets; %d steps/epoch x %d epochs = %d steps; batch %d on %d "
      "devices; selection: %s", num_classes, len(train_split.train), spe,
      config.optim.num_epochs, total_steps, batch_size, mesh.size,
      f"{sel_label} {t.select_metric} (ties: {t.select_ties}; sampling "
      f"{selection_lib.sampling(config)}, flip {selection_lib.flip(config)}) after epochs "
      f"{selection_lib.eval_epochs(config)}" if sel_split is not None
      else "none (the final weights are tested)",
  )

  if t.select_on == "test" and config.dataset.num_val_ids > 0:
    logging.warning(
        "selection on the test set, yet config.dataset.num_val_ids = %d ids are held out of "
        "training and never used; set it to 0 to train on every id (as the official run)",
        config.dataset.num_val_ids)

  def is_eval_step(done: int) -> bool:
    return done in eval_steps

  state, lr_fn = train_state_lib.create_train_state(config, num_classes, spe, mesh, model_fn)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  closed_cleanly = False
  try:
    summary = _train_loop(
        config, workdir, state, lr_fn, ckpt, setup, is_eval_step, loss_fn, max_steps)
    closed_cleanly = True
  finally:
    ckpt.close(quiet=not closed_cleanly)
  return state, summary


def _resume(
    state: train_state_lib.TrainState, ckpt: ckpt_lib.Checkpointer, is_eval_step: Callable,
    options: dict,
) -> tuple[ckpt_lib.SelectionState, bool]:
  """Restores the newest checkpoint into `state` (if any) with its selection state.

  `options` (`selection.options` of the config) must match those the checkpoint's selection
  was made with (a CheckpointError before anything is restored otherwise); the state returned
  records them. Returns (selection state, whether the evaluation at the resumed step must be
  redone: only for a checkpoint of an older version, whose selection state is unknown).
  """
  latest = ckpt.latest_step()
  if latest is None:
    return ckpt_lib.SelectionState(options=options), False
  selection = ckpt.restore_selection(latest)
  selection_lib.check_resumable(None if selection is None else selection.options, options,
                                str(epath.Path(ckpt.latest_dir) / str(latest)))
  state.load_checkpoint_tree(ckpt.restore(state.checkpoint_tree(), "latest"))
  if selection is None:
    selection = ckpt.legacy_selection(latest)
    logging.warning(
        "%s has no selection state (an older version wrote it): the evaluation history "
        "before step %d is lost; best so far: %s", epath.Path(ckpt.latest_dir) / str(latest),
        latest, "none" if selection.best_step is None else f"step {selection.best_step}")
    redo = is_eval_step(latest)
  else:
    ckpt.ensure_best(selection, latest, state.checkpoint_tree())
    redo = False
  selection.options = options
  logging.info("resumed from %s at step %d (evaluated at steps %s; best: %s)",
               ckpt.latest_dir, state.step, selection.evaluated_steps() or "none",
               "none" if selection.best_step is None else f"step {selection.best_step}")
  return selection, redo


def _train_loop(
    config: ml_collections.ConfigDict,
    workdir: str,
    state: train_state_lib.TrainState,
    lr_fn: Any,
    ckpt: ckpt_lib.Checkpointer,
    setup: run_setup.RunSetup,
    is_eval_step: Callable,
    loss_fn: train_state_lib.LossFn | None,
    max_steps: int | None,
) -> dict:
  """The body of `train_and_evaluate` once the state and checkpointer exist; the summary.

  Order at an evaluation step s (what a kill at any moment relies on, `checkpoints.py`):
  evaluate, then save `checkpoints/s` with the selection state that includes the evaluation,
  then (new best only, once `checkpoints/s` is committed) save `best/s`.
  """
  mesh, sel_split, test_split = setup.mesh, setup.selection_split, setup.test_split
  sel_label, spe = setup.selection, setup.steps_per_epoch
  metric, ties = config.train.select_metric, config.train.select_ties
  total_steps = config.optim.num_epochs * spe
  batch_size = config.data.num_ids_per_batch * config.data.num_tracklets_per_id
  options = selection_lib.options(config)
  selection, redo_eval = _resume(state, ckpt, is_eval_step, options)
  start_step = state.step
  step_fn = train_state_lib.make_train_step(state, config, mesh, lr_fn, loss_fn)
  # Both fail here (before any training) for a bad eval set-up. The selection evaluator embeds
  # with the selection's sampling / flip; the final test keeps config.eval's.
  evaluator = evaluators.from_config(state, config, mesh)
  sel_evaluator = evaluator
  if sel_split is not None and not selection_lib.same_protocol(config):
    sel_evaluator = evaluators.from_config(state, selection_lib.eval_config(config), mesh)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0
  )
  if start_step == 0:
    writer.write_hparams(results_lib.flatten(config.to_dict()))
  report = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.train.log_every_steps,
      every_secs=None,
  )
  hooks = [report] if jax.process_index() == 0 else []
  summary: dict[str, Any] = {
      "selection": sel_label if sel_split is not None else None,
      # What picked the tested checkpoint (split "none": the final weights are tested).
      "model_selection": dict(options, eval_steps=selection_lib.eval_steps(config, spe)),
      "num_classes": setup.num_classes, "steps_per_epoch": spe, "total_steps": total_steps,
  }
  stop_at = total_steps if max_steps is None else min(total_steps, max_steps)

  def select(done: int) -> dict | None:
    """Evaluates on the selection split and records it; the results if they are a new best."""
    with report.timed("eval"):
      res = sel_evaluator.run(state, sel_split.query, sel_split.gallery)
    writer.write_scalars(state.step, results_lib.scalars(sel_label, res))
    logging.info("eval on %s at step %d:\n%s", sel_label, state.step, ranking.format_table(res))
    selection.history.append({"step": done, sel_label: ranking.json_ready(res)})
    if not selection.is_better(res, metric, ties):
      return None
    selection.best_step, selection.best_metrics = done, ckpt_lib.scalar_metrics(res)
    return res

  def save_best(done: int, res: dict) -> None:
    ckpt.save_best(done, state.checkpoint_tree(), res)
    logging.info("new best %s %s %.4f at step %d", sel_label, metric, res[metric], done)

  pending: list = []
  t0, clips_seen = time.time(), 0
  with metric_writers.ensure_flushes(writer):
    if redo_eval:  # an older checkpoint: whether the evaluation at its step was done is unknown
      res = select(start_step)
      if res is not None:
        save_best(start_step, res)
    if start_step < stop_at:
      train_iter = pipeline.train_iterator(
          setup.train_split.train, config, start_step=start_step,
          process_index=jax.process_index(), process_count=jax.process_count(),
      )
      batches = sharding.prefetch_to_mesh(train_iter, mesh, config.data.prefetch)
      logging.info("compiling the train step (first step is slow)...")
      for step in range(start_step, stop_at):
        batch = next(batches)
        metrics = train_state_lib.train_step(state, step_fn, batch)
        ckpt.check_for_errors()  # a failed background save stops the run here
        pending.append((step, metrics))
        clips_seen += batch_size
        for h in hooks:
          h(state.step)
        done = state.step
        is_log = done % config.train.log_every_steps == 0 or done == stop_at
        is_eval = is_eval_step(done)
        # Every evaluation step is also a checkpoint step: its selection state is saved.
        is_ckpt = done % config.train.checkpoint_every_steps == 0 or done == total_steps \
            or is_eval
        if is_log or is_eval or is_ckpt:
          fetched = _fetch_and_check(pending)
          selection.train = fetched[-1][1]
          if is_log:
            last_train = selection.train
            selection.loss_history.append((done, last_train["loss"]))
            writer.write_scalars(done, results_lib.scalars("train", last_train))
            now = time.time()
            rate = clips_seen / max(now - t0, 1e-9)  # since the last log line
            t0, clips_seen = now, 0
            logging.info(
                "step %d/%d epoch %.2f %s clips/s %.2f", done, total_steps, done / spe,
                " ".join(f"{k} {v:.4g}" for k, v in sorted(last_train.items())), rate,
            )
        new_best = select(done) if is_eval else None
        if is_ckpt:
          with report.timed("checkpoint"):
            ckpt.save(done, state.checkpoint_tree(), selection)
        if new_best is not None:
          save_best(done, new_best)
    ckpt.wait()
    summary["step"] = state.step
    summary["train"] = selection.train
    summary["history"] = selection.history
    summary["loss_history"] = selection.loss_history
    if not selection.known:
      summary["history_incomplete"] = True  # resumed from a checkpoint of an older version
    if state.step < total_steps:
      summary["stopped_early"] = True
      return summary
    # Final test evaluation: the best checkpoint by the selection metric, else the last.
    if selection.best_step is not None and sel_split is not None:
      best_state = dataclasses.replace(state)
      best_state.load_checkpoint_tree(
          ckpt.restore(state.checkpoint_tree(), "best", step=selection.best_step))
      summary["test_checkpoint"] = f"best by {sel_label} {metric} (step {selection.best_step})"
      eval_state = best_state
    else:
      summary["test_checkpoint"] = f"final (step {state.step})"
      eval_state = state
    with report.timed("eval"):
      res = evaluator.run(eval_state, test_split.query, test_split.gallery)
    writer.write_scalars(state.step, results_lib.scalars("test", res))
    summary["test"] = res
    if sel_label == "test":
      summary["note"] = "model selected on the test set (optimistic, official-code habit)"
    table = ranking.format_table(res)
    print(f"\nTest results ({summary['test_checkpoint']}):\n{table}", flush=True)
    path = results_lib.write_results(workdir, summary)
    logging.info("results written to %s", path)
  return summary


def train_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=train`: trains (resuming if `workdir` has checkpoints), tests, writes results.json."""
  _, summary = train_and_evaluate(config, workdir)
  return summary
