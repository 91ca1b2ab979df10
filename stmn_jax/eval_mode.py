"""`--mode=eval`: test a trained workdir's best (or latest) checkpoint and write its results.

Without training checkpoints, the parameters `--mode=export` wrote (`W/export/params`).

Same dataset (no `eval_config`): the test split of `config.dataset`, results in `W/results.json`.

Cross-dataset (`eval_config="configs/dukev.py[:words]"`, as torchreid's `-s mars -t dukev`):
the model trained in `W` on `config.dataset` is tested on the test split (query / gallery) of
the eval config's dataset. Which config gives which field:
- the eval config: `dataset` (name, root, protocol, split_id, distractors, synthetic knobs)
  and where its frames come from (`data.source`, `data.tfds_data_dir`); only its test split
  is used, so no ids are held out of its training part (`num_val_ids = 0`) and nothing is
  selected (`train.select_on = "none"`);
- `config` (`--config`, with its `--config.*` overrides): everything else — the model, the
  checkpoint (`eval.checkpoint`), the embedding (`eval.sampling`, `eval.clips`, `eval.flip`,
  `data.height` / `width`, `data.seq_len`, `data.mean` / `std`, batch sizes) and the metrics
  (`eval.distance`, `rerank`, `ap`, `max_rank`): the model is tested as it was trained.
The eval config's input size must equal the model's (`data.height` x `data.width`): a
different one is refused before any work (ConfigError) rather than silently replaced, since
it means the eval config was not meant for this model (e.g. `configs/dukev.py` for a model
trained with `:smoke`; pass `configs/dukev.py:smoke`).

The eval dataset is read from the eval config's `config.dataset.root` (relative to the working
directory, as `--config`'s; e.g. `data/DukeMTMC-VideoReID`); `--config.dataset.*` overrides
reach only the training config. For another place, a config file of a few lines that calls the
dataset config's `get_config(arg)` and sets `config.dataset.root`.

Cross-dataset results go to `W/results_<eval dataset name>.json` (e.g. `results_dukev.json`),
never to `W/results.json`, which keeps the same-dataset results; the file names both datasets
(`train_dataset`, `eval_dataset`, their roots, `eval_config`). A later evaluation on a dataset
of the same name replaces it, as a later same-dataset eval replaces results.json.
"""

from __future__ import annotations

import os

import ml_collections
from absl import logging
from etils import epath

from stmn_jax import config_files
from stmn_jax import errors
from stmn_jax import evaluators
from stmn_jax import inference
from stmn_jax import ranking
from stmn_jax import results as results_lib

# Fields of the eval config's `data` section that say where its frames are (the rest of
# `data` is the model's input pipeline and comes from the training config).
EVAL_DATA_FIELDS = ("source", "tfds_data_dir")


def eval_mode(config: ml_collections.ConfigDict, workdir: str, eval_config: str = "") -> dict:
  """Restores `config.eval.checkpoint` ("best" / "latest") and evaluates it on the test split:
  of `config.dataset`, or of `eval_config`'s dataset (`path.py[:words]`; module docstring)."""
  if eval_config:
    return cross_dataset_eval(config, workdir, eval_config)
  run = inference.prepare(config, workdir)
  evaluator = evaluators.from_config(run.state, config, run.mesh)
  test = run.setup.test_split
  res = evaluator.run(run.state, test.query, test.gallery)
  print(f"\nTest results ({run.checkpoint}):\n{ranking.format_table(res)}", flush=True)
  summary = {"mode": "eval", "test_checkpoint": run.checkpoint, "step": run.step, "test": res}
  results_lib.write_results(workdir, summary)
  return summary


# ------------------------------------------------------------------------------ cross-dataset
def cross_dataset_config(
    config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict, source: str,
) -> ml_collections.ConfigDict:
  """The training `config` with the dataset of `eval_config` (module docstring); `source`
  names the eval config in errors. Raises a ConfigError when the input sizes differ."""
  model_size = (int(config.data.height), int(config.data.width))
  eval_size = (int(eval_config.data.height), int(eval_config.data.width))
  if eval_size != model_size:
    raise errors.ConfigError(
        f"--eval_config={source}: input size config.data.height x width = "
        f"{eval_size[0]}x{eval_size[1]}, but the model of --config was trained at "
        f"{model_size[0]}x{model_size[1]}; use an eval config of the model's size (e.g. the "
        f"same config words, such as :smoke)")
  cross = config.copy_and_resolve_references()
  with cross.unlocked():
    cross.dataset = eval_config.dataset.copy_and_resolve_references()
    # Only the test split is read: no ids held out of its training part, nothing selected.
    cross.dataset.num_val_ids = 0
    cross.train.select_on = "none"
    for name in EVAL_DATA_FIELDS:
      if name in eval_config.data:
        cross.data[name] = eval_config.data[name]
  return cross


def cross_results_path(workdir: str, dataset_name: str) -> epath.Path:
  """`W/results_<dataset name>.json`: the results of an evaluation on another dataset."""
  return epath.Path(workdir) / f"results_{dataset_name}.json"


def cross_dataset_eval(config: ml_collections.ConfigDict, workdir: str, eval_config: str) -> dict:
  """Tests the model of `workdir` (trained with `config`) on the test split of the dataset of
  `eval_config` (`path.py[:words]`); writes `W/results_<eval dataset>.json` (module docstring).
  The eval config is loaded and checked before the workdir is read."""
  cross = cross_dataset_config(config, config_files.load_config_file(eval_config), eval_config)
  logging.info("cross-dataset eval: the model of %s (trained on %s) on the test split of %s "
               "(%s, root %s)", workdir, config.dataset.name, cross.dataset.name, eval_config,
               cross.dataset.root)
  path = cross_results_path(workdir, cross.dataset.name)
  results_lib.check_writable(workdir, path)  # before the work, as results.json is (app.run)
  run = inference.prepare(config, workdir, data_config=cross)
  evaluator = evaluators.from_config(run.state, cross, run.mesh)
  test = run.setup.test_split
  res = evaluator.run(run.state, test.query, test.gallery)
  print(f"\nTest results on {cross.dataset.name} (trained on {config.dataset.name}; "
        f"{run.checkpoint}):\n{ranking.format_table(res)}", flush=True)
  summary = {
      "mode": "eval", "test_checkpoint": run.checkpoint, "step": run.step,
      "train_dataset": config.dataset.name, "train_dataset_root": config.dataset.root,
      "eval_dataset": cross.dataset.name, "eval_dataset_root": cross.dataset.root,
      "eval_config": eval_config, "num_query": len(test.query),
      "num_gallery": len(test.gallery), "test": res, "results_file": os.fspath(path),
  }
  results_lib.write_json(path, summary)
  return summary
