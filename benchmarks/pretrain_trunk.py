"""The main job's pretrained trunk (issue 17): the ImageNet stand-in of `configs/synthetic.py`.

  python -m benchmarks.pretrain_trunk [--steps=600] [--lr=3e-3] [--ids=300]
      [--out=configs/pretrained/synthetic_trunk.npz] [--workdir=workdir/pretrain_trunk]

The paper starts every model from ImageNet weights; the offline main job cannot download them, so
it starts from a trunk (stem, layer1-4 of its ResNet-18 at width 0.25) trained here once on a
*separate* synthetic benchmark, as `benchmarks/ablation_v2` does for the ablation:
- another generator seed (`--data_seed`, default 1; the main job's benchmark is seed 0), so other
  identities (their looks, i.e. attribute tuples, are checked disjoint from the main job's train
  and test identities before any training) and other camera scenes;
- more identities (`--ids`, default 300), no clutter, no temporal distractors and no distractor
  or junk tracklets: it teaches the trunk what a person looks like, not the main job's
  distractors;
- the main job's model, input size (64 x 32), clip length and batch, trained as the `baseline`
  (no memories) in 50-step epochs with one x0.1 decay after round(0.8 x epochs) epochs (600
  steps: after 500), then its trunk is written with torchvision keys (`.npz`, read with
  `np.load(allow_pickle=False)` through `config.model.pretrained`).

Next to the file, `<out stem>.json` records the recipe, the SHA-256 of the file, the seconds and
the pretraining benchmark's test metrics; `tests/test_pretrained_trunk.py` checks that the shipped
file matches its record, loads into every main-job model, and that the recipe's identities are
disjoint from the main job's. The training run resumes if killed (its workdir holds orbax
checkpoints). The file is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from configs import synthetic as synthetic_config

DEFAULT_OUT = synthetic_config.MAIN_JOB_TRUNK  # where the main job reads it, from any cwd
STEPS_PER_EPOCH = 50


def record_path(out: str) -> str:
  return os.path.splitext(out)[0] + ".json"


def recipe(a: argparse.Namespace) -> dict[str, Any]:
  return {"steps": a.steps, "lr": a.lr, "ids": a.ids, "test_ids": a.test_ids,
          "data_seed": a.data_seed, "seed": a.seed, "main_config": "configs/synthetic.py"}


def main_job_config():
  return synthetic_config.get_config("baseline")


def pretrain_knobs(main_knobs: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
  """The main job's generator knobs with another seed, more ids and no distractors."""
  from data_pipelines.synthetic import spec  # pylint: disable=g-import-not-at-top

  knobs = dict(main_knobs)
  knobs.update(seed=a.data_seed, num_train_ids=a.ids, num_test_ids=a.test_ids,
               num_distractor_tracklets=0, num_junk_tracklets=0, clutter_strength=0.0,
               clutter_density=0.0, **{f"{d}_prob": 0.0 for d in spec.TEMPORAL_DISTRACTORS})
  return dataclasses.asdict(spec.make_spec(knobs))


def check_disjoint(a: dict[str, Any], b: dict[str, Any]) -> int:
  """Raises ValueError if a look (attribute tuple) of benchmark `a` recurs in `b`; returns the
  number of identities checked (`ablation_v2.check_disjoint`)."""
  from benchmarks import ablation_v2  # pylint: disable=g-import-not-at-top

  try:
    return ablation_v2.check_disjoint(
        a, b, what="the pretraining benchmark and the main job's benchmark")
  except ValueError as e:
    raise ValueError(f"{e}; choose another --data_seed") from None


def pretrain_config(a: argparse.Namespace, workdir: str):
  """The main job's `baseline` config, retargeted to the pretraining benchmark."""
  c = main_job_config()
  main_knobs = c.dataset.synthetic.to_dict()
  c.seed = a.seed
  c.model.pretrained = ""
  c.dataset.root = os.path.join(workdir, "data")
  c.dataset.synthetic.update(pretrain_knobs(main_knobs, a))
  c.dataset.num_val_ids = 0
  c.train.select_on = "none"
  c.optim.learning_rate = a.lr
  c.optim.steps_per_epoch = min(STEPS_PER_EPOCH, a.steps)
  c.optim.num_epochs = max(1, a.steps // c.optim.steps_per_epoch)
  c.optim.decay_every_epochs = max(1, round(0.8 * c.optim.num_epochs))
  c.train.log_every_steps = max(1, c.optim.steps_per_epoch // 2)
  c.train.checkpoint_every_steps = c.optim.steps_per_epoch
  c.train.eval_every_epochs = c.optim.num_epochs
  c.train.keep_checkpoints = 1
  return c, main_knobs


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--ids", type=int, default=300, help="pretraining identities")
  ap.add_argument("--test_ids", type=int, default=10, help="a sanity test of the pretraining")
  ap.add_argument("--data_seed", type=int, default=1, help="generator seed (main job: 0)")
  ap.add_argument("--seed", type=int, default=0, help="training seed")
  ap.add_argument("--out", default=DEFAULT_OUT)
  ap.add_argument("--workdir", default=os.path.join("workdir", "pretrain_trunk"))
  a = ap.parse_args(argv)
  if a.steps < 1 or a.ids < 2 or a.test_ids < 1:
    ap.error("--steps >= 1, --ids >= 2 and --test_ids >= 1 expected")
  if a.steps > STEPS_PER_EPOCH and a.steps % STEPS_PER_EPOCH:
    ap.error(f"--steps={a.steps}: above {STEPS_PER_EPOCH}, a multiple of {STEPS_PER_EPOCH} "
             "expected (the schedule counts whole 50-step epochs)")
  return a


def main(argv: Sequence[str] | None = None) -> int:
  a = parse(argv)
  out = os.path.abspath(a.out)
  workdir = os.path.abspath(a.workdir)
  config, main_knobs = pretrain_config(a, workdir)
  n = check_disjoint(config.dataset.synthetic.to_dict(), main_knobs)
  print(f"pretraining {a.steps} steps on {a.ids} ids ({n} identities checked disjoint) -> {out}",
        flush=True)
  from benchmarks import ablation_v2_memory as mem  # pylint: disable=g-import-not-at-top
  from stmn_jax import train  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  state, summary = train.train_and_evaluate(config, os.path.join(workdir, "run"))
  seconds = time.time() - t0
  mem.export_trunk(state.model(), out)
  test = {k: round(float(v), 4) for k, v in (summary.get("test") or {}).items()
          if np.ndim(v) == 0 and isinstance(v, (int, float, np.number))}
  record = {"recipe": recipe(a), "sha256": sha256(out), "bytes": os.path.getsize(out),
            "seconds": round(seconds, 1), "pretrain_test": test,
            "command": " ".join(["python -m benchmarks.pretrain_trunk",
                                 *(sys.argv[1:] if argv is None else argv)])}
  tmp = record_path(out) + f".tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, record_path(out))
  print(json.dumps(record, indent=1, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
