"""`--mode=eval`: test a trained workdir's best (or latest) checkpoint and write results.json.

Without training checkpoints, the parameters `--mode=export` wrote (`W/export/params`).
"""

from __future__ import annotations

import ml_collections

from stmn_jax import evaluators
from stmn_jax import inference
from stmn_jax import ranking
from stmn_jax import results as results_lib


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores `config.eval.checkpoint` ("best" / "latest"), evaluates it on the test split."""
  run = inference.prepare(config, workdir)
  evaluator = evaluators.from_config(run.state, config, run.mesh)
  test = run.setup.test_split
  res = evaluator.run(run.state, test.query, test.gallery)
  print(f"\nTest results ({run.checkpoint}):\n{ranking.format_table(res)}", flush=True)
  summary = {"mode": "eval", "test_checkpoint": run.checkpoint, "step": run.step, "test": res}
  results_lib.write_results(workdir, summary)
  return summary
