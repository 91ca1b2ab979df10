"""Entry point: `python main.py --config=configs/synthetic.py[:words] --workdir=DIR [--mode=...]`.

Flags only; everything else lives in `stmn_jax.app` (modes) and `stmn_jax.train`. Override any
config field with `--config.<key>=<value>`, e.g. `--config.optim.num_epochs=3`.

Known user errors (`stmn_jax.errors.USER_ERRORS`: config, dataset, checkpoint, workdir,
non-finite loss) print `main.py: <message>` and exit 1, without a traceback; `--verbose` or
`STMN_VERBOSE=1` shows it. Any other exception keeps its traceback.
"""

from __future__ import annotations

import sys

import tensorflow as tf
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stmn_jax import app as stmn_app
from stmn_jax import errors
from stmn_jax import sharding

DEFAULT_CONFIG = "configs/synthetic.py"
FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Config file, `path.py[:model,smoke]`.", lock_config=True
  )
  flags.DEFINE_string(
      "workdir", "", "Checkpoints, TensorBoard logs, results.json "
      "(default: workdir/<config name>[_<words>]).")
  flags.DEFINE_string("mode", "train",
                      "train | eval | export | extract | search | visualize "
                      "(stmn_jax.app.MODES).")
  flags.DEFINE_string("export_dir", "", "--mode=export: SavedModel folder "
                      "(default: workdir/export/saved_model).")
  flags.DEFINE_string("export_format", "", "--mode=export: savedmodel (default) | onnx "
                      "(W/export/model.onnx).")
  flags.DEFINE_string("eval_config", "", "--mode=eval: evaluate on another dataset's test split, "
                      "e.g. configs/dukev.py (cross-dataset; the trained model comes from "
                      "--workdir).")
  flags.DEFINE_string("split", "", "--mode=extract: query | gallery | train (default query); "
                      "--mode=visualize: the part the tracklet figures draw from "
                      "(default gallery).")
  flags.DEFINE_string("input_dir", "", "--mode=extract: one sub-folder of frames per tracklet "
                      "(optional tracklets.csv: tracklet, pid, camera).")
  flags.DEFINE_string("query", "", "--mode=search: one sub-folder of frames per query tracklet "
                      "(optional tracklets.csv: tracklet, pid, camera).")
  flags.DEFINE_string("gallery", "", "--mode=search: gallery embeddings FEATURES.npy of "
                      "--mode=extract (its FEATURES.csv index next to it).")
  flags.DEFINE_integer("topk", 0, "--mode=search / visualize: gallery tracklets listed per "
                       "query (default 10; visualize: config.visualize.topk).")
  flags.DEFINE_string("compare_workdir", "", "--mode=visualize: a second workdir of the same "
                      "architecture (e.g. trained without the spread loss) drawn beside "
                      "--workdir in the memory and curve figures.")
  flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0.")
  flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
  flags.DEFINE_integer("process_id", -1, "Multi-process: this process's id.")
  flags.DEFINE_bool("verbose", False, "Known errors (config, dataset, checkpoint, workdir, "
                    "non-finite loss) with their traceback, not only their message "
                    f"(also {errors.VERBOSE_ENV}=1).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  errors.report_user_errors(run, verbose=FLAGS.verbose or errors.verbose_from_env())


def run() -> None:
  """Joins a multi-process run, then runs the mode of the flags."""
  # TF (tf.data) must not take the accelerators JAX uses.
  tf.config.set_visible_devices([], "GPU")
  sharding.maybe_initialize_distributed(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  config_arg = FLAGS["config"].config_filename if hasattr(FLAGS["config"], "config_filename") \
      else DEFAULT_CONFIG
  workdir = FLAGS.workdir or stmn_app.default_workdir(config_arg)
  logging.info("workdir: %s", workdir)
  stmn_app.run(FLAGS.config, workdir, FLAGS.mode, **mode_options(FLAGS.mode))


def verbose_requested(argv: list[str]) -> bool:
  """`--verbose` (or `--verbose=true`) on the command line, or STMN_VERBOSE=1, before flags
  are parsed."""
  for a in argv:
    if a == "--":
      break
    if a == "--verbose" or a.lower() in ("--verbose=true", "--verbose=1"):
      return True
  return errors.verbose_from_env()


def mode_options(mode: str) -> dict:
  """The mode-specific flags given on the command line, as keyword arguments of the mode."""
  given = {"export_dir": FLAGS.export_dir, "export_format": FLAGS.export_format,
           "eval_config": FLAGS.eval_config, "split": FLAGS.split, "input_dir": FLAGS.input_dir,
           "query": FLAGS.query, "gallery": FLAGS.gallery, "topk": FLAGS.topk,
           "compare_workdir": FLAGS.compare_workdir}
  allowed = {"export": ("export_dir", "export_format"), "eval": ("eval_config",),
             "extract": ("split", "input_dir"),
             "search": ("query", "gallery", "topk"),
             "visualize": ("split", "topk", "compare_workdir")}.get(mode, ())
  for name, value in given.items():
    if value and name not in allowed:
      raise app.UsageError(f"--{name} is not a flag of --mode={mode}")
  return {name: given[name] for name in allowed if given[name]}


if __name__ == "__main__":
  errors.report_user_errors(
      lambda: stmn_app.check_config_overrides(sys.argv[1:], DEFAULT_CONFIG),
      verbose=verbose_requested(sys.argv[1:]))
  define_flags()
  app.run(main)
