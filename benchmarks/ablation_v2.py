"""Ablation v2 (issue 17): STMN's claims on the synthetic benchmark in a regime where they can
show. `python -m benchmarks.ablation --protocol=v2 [flags]` (or `python -m
benchmarks.ablation_v2`); `--dry_run` prints the plan and its time estimate.

The protocol (the reasons are in docs/RESULTS.md, "Ablation v2: protocol and plan"):
1. Pretraining, the ImageNet stand-in: the `baseline` model (no memories) is trained once on a
   separate synthetic benchmark, `pretrain_knobs`: another generator seed (other identities,
   checked disjoint from the ablation's by their attribute tuples, and other camera scenes),
   `pretrain_ids` identities, no clutter and no temporal distractors. Its stem, layer1-3 and
   layer4 are written to `<workdir>/pretrained/trunk.npz` (torchvision keys, read with
   `np.load(allow_pickle=False)` through `config.model.pretrained`), which every run loads.
2. Four benchmarks, one distractor family each (`FAMILIES`), same identities, tracklets and
   cameras: `clutter` (per-camera background clutter only), `temporal` (occlusion, exit,
   misalignment, intruders only), `all`, `none`; illumination and sensor noise stay on in all.
3. Runs: family x variant x seed, each fine-tuned from the trunk for `steps` steps at
   `height` x `width` with last stride 1 (an 8 x 4 map at 128 x 64), evaluated once on the test
   split (all-frames clips, flip averaged). A checkpoint is kept every `stats_every` steps;
   after training the memory statistics of `ablation_v2_memory` at step 0 (before training) and
   at every kept checkpoint are logged to `memory_stats.json` (`SETTLE_TOL`, `MOVED`: the
   "settled" and "moved" flags of `result.json`).
4. Table: per family, mean ± sd per variant and paired differences with 95% t intervals over
   seeds (`ablation_v2_stats`), the memory statistics, figures; `--results_md` gets the section.

Resume: each run writes `result.json` last and atomically; a rerun skips finished runs and a
killed run resumes from its newest checkpoint (every `stats_every` steps) with its statistics.
Runs are ordered seed-major, so a cut-off table still has every family x variant at the first
seeds. `--stop_after_h` starts no new run after that many hours (a rerun continues).
`--jobs=k` prepares data and the trunk, then runs k single-thread `--shard=i/k` processes (each
runs every k-th run), as the v1 runner's two jobs; `--measure` writes `<workdir>/cost.json`
(`ablation_v2_cost`), which `--dry_run` reads (else the committed `ablation_v2_pilot.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from etils import epath

from data_pipelines.synthetic import spec as synth_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("baseline", "sm", "tm", "stmn_nospread", "stmn")
EXTRA_VARIANTS = ("sm_nospread", "tm_nospread")
TEMPORAL_OFF = {f"{d}_prob": 0.0 for d in synth_spec.TEMPORAL_DISTRACTORS}
CLUTTER_OFF = {"clutter_strength": 0.0, "clutter_density": 0.0}
FAMILIES: dict[str, dict[str, float]] = {
    "clutter": dict(TEMPORAL_OFF), "temporal": dict(CLUTTER_OFF), "all": {},
    "none": {**CLUTTER_OFF, **TEMPORAL_OFF}}
# Differences reported (a - b): each memory on the baseline, the two together, the spread loss.
PAIRS = (("sm", "baseline"), ("tm", "baseline"), ("stmn", "baseline"),
         ("stmn_nospread", "baseline"), ("stmn", "stmn_nospread"), ("stmn", "sm"), ("stmn", "tm"),
         ("sm", "sm_nospread"), ("tm", "tm_nospread"))
# "Settled": over the last SETTLE_WINDOW of training every logged value of a statistic is within
# SETTLE_REL of its whole movement (|final - first logged|), or within its floor, of the final
# value. "Moved": the final value is at least MOVED away from the step-0 value (the pretrained
# trunk with freshly initialised memories, logged before training). A memory frozen near its
# initial state is "settled" but not "moved" (the v1 failure).
SETTLE_TOL = {"spatial_entropy": 0.005, "temporal_entropy": 0.005, "weight_contrast": 0.01,
              "readout_ratio": 0.002}  # floors
SETTLE_REL = 0.1
SETTLE_WINDOW = 0.3
MOVED = {"spatial_entropy": 0.05, "temporal_entropy": 0.05, "weight_contrast": 0.05,
         "readout_ratio": 0.05}
BEGIN, END = "<!-- ablation-v2:begin -->", "<!-- ablation-v2:end -->"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Sizes of one protocol (`PROTOCOLS`); times come from the measured per-step cost."""

  height: int = 128
  width: int = 64
  last_stride: int = 1
  net_width: float = 0.125  # ResNet-18 width multiplier
  seq_len: int = 4
  ids_per_batch: int = 8
  tracklets_per_id: int = 2
  train_ids: int = 60
  test_ids: int = 100  # ~250 queries (v1: 40 ids, 98 queries)
  steps: int = 600  # the pilot: the read-out still grew at step 200 (0.8% of ||f_o||)
  stats_every: int = 50
  learning_rate: float = 3e-3
  decay_at: float = 0.8  # x0.1 after this fraction of the steps
  stats_tracklets: int = 64
  eval_batch_size: int = 64
  pretrain_ids: int = 300
  pretrain_test_ids: int = 10
  pretrain_steps: int = 600
  pretrain_lr: float = 3e-3
  pretrain_data_seed: int = 1  # the ablation benchmarks use generator seed 0
  spatial_slots: int = 10
  temporal_slots: int = 5
  smoke: bool = False  # tiny tracklets (tests)

  def __post_init__(self):
    if self.steps < 1 or self.stats_every < 1 or self.steps % self.stats_every:
      raise ValueError(f"protocol: steps ({self.steps}) must be a positive multiple of "
                       f"stats_every ({self.stats_every})")

  @property
  def stats_steps(self) -> list[int]:
    return list(range(self.stats_every, self.steps, self.stats_every)) + [self.steps]


PROTOCOLS = {
    "full": Protocol(),
    "toy": Protocol(height=64, width=32, net_width=0.125, tracklets_per_id=2, ids_per_batch=4,
                    train_ids=8, test_ids=4, steps=4, stats_every=2, stats_tracklets=8,
                    eval_batch_size=8, pretrain_ids=8, pretrain_test_ids=2, pretrain_steps=4,
                    pretrain_lr=1e-3, spatial_slots=4, temporal_slots=3, smoke=True),
}


def wpath(root: str, *parts: str) -> str:
  """`root/parts...` as an absolute path string (`etils.epath`, so workdirs may be cloud paths)."""
  base = epath.Path(root)
  return os.fspath((base if "://" in os.fspath(root) else base.resolve()).joinpath(*parts))


@dataclasses.dataclass(frozen=True)
class Run:
  family: str
  variant: str
  seed: int

  def workdir(self, root: str) -> str:
    return wpath(root, self.family, self.variant, f"seed{self.seed}")


def plan_runs(families: Sequence[str], variants: Sequence[str],
              seeds: Sequence[int]) -> list[Run]:
  """Seed-major order: all family x variant cells at seed 0, then at seed 1, ..."""
  return [Run(f, v, s) for s in seeds for f in families for v in variants]


# ------------------------------------------------------------------------------ configs
def _smoke_knobs() -> dict[str, Any]:
  return dict(num_cameras=3, min_cameras_per_id=2, max_cameras_per_id=2,
              max_tracklets_per_camera=2, min_length=4, short_max_length=8, max_length=12,
              long_fraction=0.1, num_distractor_tracklets=2, num_junk_tracklets=1)


def family_knobs(p: Protocol, family: str) -> dict[str, Any]:
  """Generator knobs of one family's benchmark (generator seed 0, rendered at the input size)."""
  if family not in FAMILIES:
    raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
  knobs = synth_spec.defaults()
  knobs.update(height=p.height, width=p.width, num_train_ids=p.train_ids,
               num_test_ids=p.test_ids)
  if p.smoke:
    knobs.update(_smoke_knobs())
  knobs.update(FAMILIES[family])
  return dataclasses.asdict(synth_spec.make_spec(knobs))


def pretrain_knobs(p: Protocol) -> dict[str, Any]:
  """The pretraining benchmark: another generator seed, more ids, no distractor family."""
  knobs = synth_spec.defaults()
  knobs.update(height=p.height, width=p.width, seed=p.pretrain_data_seed,
               num_train_ids=p.pretrain_ids, num_test_ids=p.pretrain_test_ids,
               num_distractor_tracklets=0, num_junk_tracklets=0, **FAMILIES["none"])
  if p.smoke:
    knobs.update({k: v for k, v in _smoke_knobs().items() if not k.startswith("num_")})
  return dataclasses.asdict(synth_spec.make_spec(knobs))


def check_disjoint(a: dict[str, Any], b: dict[str, Any],
                   what: str = "pretraining and ablation benchmarks") -> int:
  """Raises if a look (attribute tuple) of benchmark `a` recurs in `b` (`what`: the two, for the
  message); returns the ids checked."""
  from data_pipelines.synthetic import generator  # pylint: disable=g-import-not-at-top

  ia, _ = generator.make_identities(synth_spec.make_spec(a))
  ib, _ = generator.make_identities(synth_spec.make_spec(b))
  common = {x.as_tuple() for x in ia} & {x.as_tuple() for x in ib}
  if common:
    raise ValueError(f"{what} share {len(common)} identities")
  return len(ia) + len(ib)


def _base_config(p: Protocol, preset: str, root: str, knobs: dict[str, Any], seed: int,
                 steps: int, lr: float, pretrained: str):
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  c = synthetic.get_config(f"{preset},ablation")
  c.seed = int(seed)
  c.dataset.root = root
  c.dataset.synthetic.update(knobs)
  c.dataset.num_val_ids = 0
  c.data.height, c.data.width, c.data.seq_len = p.height, p.width, p.seq_len
  c.data.num_ids_per_batch, c.data.num_tracklets_per_id = p.ids_per_batch, p.tracklets_per_id
  c.data.eval_batch_size = p.eval_batch_size
  if p.smoke:
    c.data.shuffle_buffer = 16
  c.model.depth, c.model.width, c.model.last_stride = 18, p.net_width, p.last_stride
  c.model.spatial_slots, c.model.temporal_slots = p.spatial_slots, p.temporal_slots
  c.model.pretrained = pretrained
  every = p.stats_every if steps % p.stats_every == 0 else max(1, steps // 4)
  c.optim.learning_rate = lr
  c.optim.steps_per_epoch = every  # an "epoch" = one statistics interval
  c.optim.num_epochs = max(1, math.ceil(steps / every))
  c.optim.decay_every_epochs = max(1, round(p.decay_at * c.optim.num_epochs))
  c.train.log_every_steps = max(1, every // 5)
  c.train.checkpoint_every_steps = every
  c.train.eval_every_epochs = c.optim.num_epochs
  c.train.keep_checkpoints = 2
  c.eval.sampling = "all_frames"
  c.eval.checkpoint = "latest"
  return c


def run_config(p: Protocol, run: Run, root: str, pretrained: str):
  """The main.py config of one run (printed by --dry_run as flags)."""
  return _base_config(p, run.variant, data_root(root, run.family), family_knobs(p, run.family),
                      run.seed, p.steps, p.learning_rate, pretrained)


def pretrain_config(p: Protocol, root: str):
  return _base_config(p, "baseline", data_root(root, "pretrain"), pretrain_knobs(p), 0,
                      p.pretrain_steps, p.pretrain_lr, "")


def data_root(root: str, name: str) -> str:
  return wpath(root, "data", name)


def trunk_path(root: str) -> str:
  return wpath(root, "pretrained", "trunk.npz")


# ------------------------------------------------------------------------------ files
def read_json(path: str) -> Any:
  p = epath.Path(path)
  try:
    return json.loads(p.read_text())
  except (OSError, ValueError):
    return None


def write_json(path: str, obj: Any) -> None:
  """Atomic: a temporary file renamed over `path`."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f"{p.name}.tmp{os.getpid()}"
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=float))
  tmp.replace(p)


def scalar_metrics(res: dict) -> dict[str, float]:
  """The scalar entries of an evaluation result (R1, mAP, ...), as floats."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  return {k: float(v) for k, v in res.items()
          if np.ndim(v) == 0 and isinstance(v, (int, float, np.number))}


def shown_path(path: str) -> str:
  """`path` relative to the repository when inside it (docs), else absolute."""
  rel = os.path.relpath(os.path.abspath(path), REPO)
  return path if rel.startswith("..") else rel


def _log(msg: str) -> None:
  print(f"[ablation-v2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ running
def pretrain_recipe(p: Protocol) -> dict[str, Any]:
  """What the trunk file depends on (checked when a cached trunk is reused)."""
  keys = ("height", "width", "last_stride", "net_width", "seq_len", "ids_per_batch",
          "tracklets_per_id", "pretrain_ids", "pretrain_test_ids", "pretrain_steps",
          "pretrain_lr", "pretrain_data_seed")
  return {k: getattr(p, k) for k in keys}


def pretrain(p: Protocol, root: str) -> str:
  """Trains the baseline on the pretraining benchmark (resumable) and writes the trunk file;
  a no-op when the file exists."""
  path = trunk_path(root)
  record = wpath(root, "pretrained", "pretrain.json")
  if epath.Path(path).exists():
    made = (read_json(record) or {}).get("recipe")
    if made is not None and made != pretrain_recipe(p):
      raise ValueError(f"{path} was pretrained with another recipe than this protocol's "
                       f"({record}: {made} vs {pretrain_recipe(p)}); delete "
                       f"{wpath(root, 'pretrained')} (and {wpath(root, 'pretrain')}) to "
                       "pretrain again")
    return path
  from stmn_jax import train  # pylint: disable=g-import-not-at-top
  from benchmarks import ablation_v2_memory as mem  # pylint: disable=g-import-not-at-top

  n = check_disjoint(pretrain_knobs(p), family_knobs(p, "all"))
  _log(f"pretraining ({p.pretrain_steps} steps; {n} identities checked disjoint) -> {path}")
  t0 = time.time()
  state, summary = train.train_and_evaluate(pretrain_config(p, root),
                                            wpath(root, "pretrain"))
  mem.export_trunk(state.model(), path)
  write_json(record,
             {"seconds": time.time() - t0, "steps": p.pretrain_steps,
              "recipe": pretrain_recipe(p),
              "test": scalar_metrics(summary.get("test") or {}), "knobs": pretrain_knobs(p)})
  return path


STATS = ("spatial_entropy", "spatial_top1", "temporal_entropy", "temporal_top1",
         "weight_contrast", "readout_ratio")


def has_memory(state) -> bool:
  model = state.model()
  return bool(getattr(model, "use_spatial", False) or getattr(model, "use_temporal", False))


def run_one(p: Protocol, run: Run, root: str, pretrained: str) -> dict:
  """Trains one run (resuming from its newest checkpoint; a checkpoint every `stats_every`
  steps, all kept), then logs the memory statistics of every checkpoint not logged yet,
  writes `result.json` last and deletes the intermediate checkpoints; returns the result
  (read back when the run is already finished).

  Statistics are computed from the kept checkpoints after training rather than by stopping
  training at each interval: one `train_and_evaluate` call per run (the pilot measured about
  24 s of set-up, tracing and checkpoint overhead per call under load)."""
  w = run.workdir(root)
  done = read_json(wpath(w, "result.json"))
  if done is not None:
    return done
  import jax  # pylint: disable=g-import-not-at-top
  from stmn_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from stmn_jax import run_setup, train, visualize  # pylint: disable=g-import-not-at-top
  from stmn_jax import train_state as train_lib  # pylint: disable=g-import-not-at-top
  from benchmarks import ablation_v2_memory as mem  # pylint: disable=g-import-not-at-top

  config = run_config(p, run, root, pretrained)
  config.train.keep_checkpoints = len(p.stats_steps) + 1
  stats_path = wpath(w, "memory_stats.json")
  log = read_json(stats_path) or {"records": [], "seconds": 0.0}
  have = {r["step"] for r in log["records"]}
  wanted = [0, *p.stats_steps]  # step 0: the pretrained trunk with freshly initialised memories
  t0 = time.time()
  mem_on = bool(config.model.spatial_memory or config.model.temporal_memory)
  if mem_on:
    setup = run_setup.prepare_run(config)
    tracklets = list(setup.test_split.gallery)
    meta = visualize.synthetic_meta(config, tracklets)
    ids = mem.pick_tracklets(tracklets, meta, p.stats_tracklets, p.seq_len)

    def record(at, step: int, loss: float | None) -> None:
      rec = mem.memory_stats_at(at, config, setup.mesh, forward, tracklets, meta, ids)
      rec.update(step=step, loss=loss)
      log["records"].append(rec)
      have.add(step)
      _log(f"{run} step {step}/{p.steps}: " + ", ".join(
          f"{k} {rec[k]:.3f}" for k in mem.STAT_KEYS if rec.get(k) is not None))

    if 0 not in have:  # the same initial state train_and_evaluate starts from (same seed)
      state0, _ = train_lib.create_train_state(config, setup.num_classes,
                                               setup.steps_per_epoch, setup.mesh)
      forward = mem.make_stats_forward(state0, setup.mesh)
      record(state0, 0, None)
      write_json(stats_path, log)
  log["stats_seconds"] = log.get("stats_seconds", 0.0) + time.time() - t0
  t0 = time.time()
  state, summary = train.train_and_evaluate(config, w)
  if "test" not in summary:
    raise RuntimeError(f"{w}: training ended without test results")
  log["train_seconds"] = time.time() - t0
  t0 = time.time()
  todo = [s for s in wanted if s not in have]
  if todo and mem_on:
    forward = mem.make_stats_forward(state, setup.mesh)
    losses = dict(summary.get("loss_history") or [])
    with ckpt_lib.Checkpointer(w, keep=config.train.keep_checkpoints, read_only=True) as ckpt:
      for step in todo:
        at = dataclasses.replace(state)
        at.load_checkpoint_tree(ckpt.restore(state.checkpoint_tree(), "latest", step=step))
        record(at, step, losses.get(step))
  elif todo:  # no memory: nothing to measure, one empty record per step
    log["records"] += [{"step": s, "clips": 0, **{k: None for k in STATS}} for s in todo]
  log["stats_seconds"] = log.get("stats_seconds", 0.0) + time.time() - t0
  log["seconds"] = log["train_seconds"] + log["stats_seconds"]
  write_json(stats_path, log)
  result = summarize(p, run, log, summary, jax.device_count())
  write_json(wpath(w, "result.json"), result)
  for step in p.stats_steps[:-1]:  # keep the final checkpoint only (figures, inspection)
    epath.Path(w, "checkpoints", str(step)).rmtree(missing_ok=True)
  return result


def summarize(p: Protocol, run: Run, log: dict, summary: dict, devices: int) -> dict:
  """`result.json`: test metrics, the final statistics and whether they had settled."""
  from benchmarks import ablation_v2_stats as st  # pylint: disable=g-import-not-at-top

  recs = sorted(log["records"], key=lambda r: r["step"])
  steps = [r["step"] for r in recs]
  settle: dict[str, Any] = {"steps": {}, "moved": {}}
  for k, floor in SETTLE_TOL.items():
    vals = [r.get(k) for r in recs]
    known = [v for v in vals if v is not None]
    tol = max(floor, SETTLE_REL * abs(known[-1] - known[0])) if known else floor
    settle[k] = st.settled(steps, vals, tol, SETTLE_WINDOW)
    settle["steps"][k] = st.settle_step(steps, vals, tol)
    settle["moved"][k] = abs(known[-1] - known[0]) >= MOVED[k] if known else None
  flags = [settle[k] for k in SETTLE_TOL if settle[k] is not None]
  settle["all"] = all(flags) if flags else None
  moved = [v for v in settle["moved"].values() if v is not None]
  settle["any_moved"] = any(moved) if moved else None
  return {"family": run.family, "variant": run.variant, "seed": run.seed,
          "test": scalar_metrics(summary["test"]),
          "num_query": int(summary["test"].get("num_valid_queries", 0)),
          "steps": p.steps, "seconds": log["seconds"], "memory_final": recs[-1],
          "settle": settle, "protocol": dataclasses.asdict(p), "devices": devices}


def prepare(p: Protocol, root: str, families: Sequence[str]) -> str:
  """Generates every family's benchmark, then pretrains (each once); returns the trunk file."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

  for f in families:
    t0 = time.time()
    synthetic.ensure_generated(data_root(root, f), family_knobs(p, f))
    _log(f"benchmark {f}: {data_root(root, f)} ({time.time() - t0:.0f} s)")
  return pretrain(p, root)


def run_all(p: Protocol, runs: Sequence[Run], root: str, shard: tuple[int, int] = (0, 1),
            stop_after_s: float = 0.0) -> list[str]:
  """Every run of this shard in order (after `prepare`), starting none after `stop_after_s`
  seconds (0: no limit); returns the failures."""
  start = time.time()
  path = prepare(p, root, sorted({r.family for r in runs}))
  errors = []
  for i, r in enumerate(runs):
    if i % shard[1] != shard[0]:
      continue
    if stop_after_s and time.time() - start > stop_after_s:
      _log(f"--stop_after_h reached: {r} and later runs left for a rerun of this command")
      break
    t0 = time.time()
    try:
      res = run_one(p, r, root, path)
      _log(f"{r}: mAP {100 * res['test']['mAP']:.1f} ({time.time() - t0:.0f} s)")
    except Exception as e:  # pylint: disable=broad-except  # one failure must not stop the table
      errors.append(f"{r}: {e}")
      _log(f"FAILED {r}: {e}")
  return errors


def run_jobs(a: argparse.Namespace, argv: Sequence[str], p: Protocol, runs: Sequence[Run]
             ) -> list[str]:
  """`--jobs=k`: data and pretraining here (every core), then k shard processes of this
  command (`--shard=i/k`, one XLA thread each, as the v1 runner), each logging to
  `<workdir>/shard<i>.log`; returns the failed shards."""
  from benchmarks import ablation  # pylint: disable=g-import-not-at-top

  prepare(p, a.workdir, sorted({r.family for r in runs}))
  env = ablation.subprocess_env(a.workdir, a.jobs)
  args = [x for x in argv if not x.startswith(("--jobs", "--shard", "--results_md"))]
  procs = []
  for i in range(a.jobs):
    log = epath.Path(a.workdir).resolve() / f"shard{i}.log"
    cmd = [sys.executable, "-m", "benchmarks.ablation_v2", *args, f"--shard={i}/{a.jobs}",
           "--no_report", f"--workdir={wpath(a.workdir)}"]
    _log(f"shard {i}: {' '.join(cmd)} > {log}")
    with log.open("a") as f:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                    stderr=subprocess.STDOUT))
  return [f"shard {i}: exit code {rc}" for i, rc in enumerate(x.wait() for x in procs) if rc]


def collect(root: str, runs: Sequence[Run]) -> list[dict]:
  return [r for r in (read_json(wpath(x.workdir(root), "result.json")) for x in runs)
          if r is not None]


# ------------------------------------------------------------------------------ plan
def estimate(p: Protocol, runs: Sequence[Run], cost: dict[str, float], done: int = 0,
             pretrained: bool = False) -> dict[str, float]:
  """Seconds for the plan from a measured cost: {"step_s": {variant: s}, "eval_s",
  "stats_s" (one statistics pass), "overhead_s" (per run: set-up, tracing, checkpoints,
  restores), "pretrain_step_s", "data_s" (one benchmark)}."""
  per_run = {}
  for v in {r.variant for r in runs}:
    per_run[v] = (p.steps * cost["step_s"].get(v, max(cost["step_s"].values()))
                  + cost["eval_s"] + cost["overhead_s"]
                  + (len(p.stats_steps) + 1) * cost["stats_s"])  # + the step-0 pass
  todo = list(runs)[done:]
  runs_s = sum(per_run[r.variant] for r in todo)
  pre_s = 0.0 if pretrained else p.pretrain_steps * cost["pretrain_step_s"] + cost["eval_s"]
  data_s = cost["data_s"] * (len({r.family for r in runs}) + (0 if pretrained else 1))
  # First run of each variant: its train step compiles (later runs hit the compilation cache).
  compile_s = sum(cost.get("compile_s", {}).get(v, 0.0) for v in {r.variant for r in todo})
  return {"runs_s": runs_s, "pretrain_s": pre_s, "data_s": data_s, "compile_s": compile_s,
          "total_s": runs_s + pre_s + data_s + compile_s, "per_run_s": per_run}


def plan_text(p: Protocol, runs: Sequence[Run], root: str, cost: dict | None) -> str:
  """The --dry_run printout: sizes, runs (done or not), estimated time."""
  done = [r for r in runs if epath.Path(r.workdir(root), "result.json").exists()]
  lines = [f"ablation v2 plan: {len(runs)} runs ({len(done)} done), {p.steps} steps each at "
           f"{p.height}x{p.width} (last stride {p.last_stride}), ResNet-18 w{p.net_width}, "
           f"batch {p.ids_per_batch}x{p.tracklets_per_id}x{p.seq_len}; statistics every "
           f"{p.stats_every} steps; pretraining {p.pretrain_steps} steps on {p.pretrain_ids} ids "
           f"({'cached' if epath.Path(trunk_path(root)).exists() else 'to do'}: "
           f"{trunk_path(root)})"]
  for r in runs:
    lines.append(f"  {'done' if r in done else 'todo'} {r.family:9s} {r.variant:14s} "
                 f"seed{r.seed}  {r.workdir(root)}")
  if cost:
    todo = [r for r in runs if r not in done]
    e = estimate(p, todo, cost, pretrained=epath.Path(trunk_path(root)).exists())
    per = ", ".join(f"{v} {s / 60:.1f} min" for v, s in sorted(e["per_run_s"].items()))
    lines.append(f"estimate (one process, cost measured {cost.get('measured', '?')}): "
                 f"pretraining {e['pretrain_s'] / 60:.1f} min, data {e['data_s'] / 60:.1f} min, "
                 f"compiles {e['compile_s'] / 60:.1f} min, "
                 f"runs {e['runs_s'] / 60:.1f} min ({per}); total {e['total_s'] / 3600:.2f} h")
  else:
    lines.append(f"no measured cost: run `--measure` first ({cost_path(root)})")
  return "\n".join(lines)


def cost_path(root: str) -> str:
  return wpath(root, "cost.json")


PILOT_COST = os.path.join(REPO, "benchmarks", "ablation_v2_pilot.json")


def load_cost(root: str) -> dict | None:
  """The workdir's measured cost (`--measure`), else the committed pilot measurement."""
  cost = read_json(cost_path(root))
  if cost is None:
    cost = read_json(PILOT_COST)
    if cost is not None:
      cost["measured"] = f"{cost.get('measured', '?')}, committed pilot {shown_path(PILOT_COST)}"
  return cost


def _names(text: str, valid: Sequence[str], flag: str) -> list[str]:
  names = [w.strip() for w in text.split(",") if w.strip()]
  bad = [n for n in names if n not in valid]
  if bad or not names:
    raise SystemExit(f"--{flag}={text!r}: expected a comma list of {', '.join(valid)}")
  return names


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.ablation --protocol=v2",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="full", choices=sorted(PROTOCOLS))
  ap.add_argument("--families", default=",".join(FAMILIES))
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--stop_after_h", type=float, default=0.0,
                  help="start no new run after this many hours (then write the table)")
  ap.add_argument("--workdir", default="workdir/ablation_v2")
  ap.add_argument("--shard", default="0/1", help="i/k: this process runs runs i, i+k, ...")
  ap.add_argument("--jobs", type=int, default=1, help="k shard processes of one thread each")
  ap.add_argument("--no_report", action="store_true", help="run only (shards)")
  ap.add_argument("--dry_run", action="store_true", help="print the plan and estimate only")
  ap.add_argument("--measure", action="store_true",
                  help="measure the per-step costs (benchmarks.ablation_v2_cost) and exit")
  ap.add_argument("--aggregate_only", action="store_true")
  ap.add_argument("--results_md", default="", help="write the table section into this file")
  ap.add_argument("--steps", type=int, default=0, help="override the protocol's steps")
  ap.add_argument("--stats_every", type=int, default=0, help="override: statistics interval")
  ap.add_argument("--pretrain_steps", type=int, default=0)
  ap.add_argument("--lr", type=float, default=0.0, help="override: fine-tuning learning rate")
  ap.add_argument("--decay_at", type=float, default=0.0,
                  help="override: fraction of the steps after which the rate drops x0.1")
  ap.add_argument("--no_figures", action="store_true", help="skip the --mode=visualize figures")
  ap.add_argument("--figures_dir", default="",
                  help="copy the figures here (e.g. docs/figures/ablation_v2) and show them in "
                       "the section (paths relative to --results_md)")
  ap.add_argument("--jax_cache", default=None,
                  help="persistent XLA compilation cache (default <workdir>/jax_cache; '' = off)")
  return ap.parse_args(argv)


def enable_compile_cache(path: str) -> None:
  """Every run after the first of a variant loads its compiled programs from `path`."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", wpath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def protocol_of(a: argparse.Namespace) -> Protocol:
  p = PROTOCOLS[a.size]
  if a.steps or a.stats_every:
    p = dataclasses.replace(p, steps=a.steps or p.steps, stats_every=a.stats_every or
                            p.stats_every)
  if a.pretrain_steps:
    p = dataclasses.replace(p, pretrain_steps=a.pretrain_steps)
  if a.lr:
    p = dataclasses.replace(p, learning_rate=a.lr)
  if a.decay_at:
    p = dataclasses.replace(p, decay_at=a.decay_at)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  a = parse(argv)
  try:
    p = protocol_of(a)
  except ValueError as e:
    raise SystemExit(f"--steps / --stats_every: {e}") from None
  families = _names(a.families, tuple(FAMILIES), "families")
  variants = _names(a.variants, VARIANTS + EXTRA_VARIANTS, "variants")
  try:
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    shard = tuple(int(x) for x in a.shard.split("/"))
    assert len(shard) == 2 and 0 <= shard[0] < shard[1]
  except (ValueError, AssertionError):
    raise SystemExit(f"--seeds={a.seeds!r} / --shard={a.shard!r}: expected integers "
                     "(seeds: a comma list; shard: i/k with 0 <= i < k)") from None
  runs = plan_runs(families, variants, seeds)
  cache = wpath(a.workdir, "jax_cache") if a.jax_cache is None else a.jax_cache
  if cache and not a.dry_run:
    enable_compile_cache(cache)
  if a.measure:
    from benchmarks import ablation_v2_cost  # pylint: disable=g-import-not-at-top

    cost = ablation_v2_cost.measure(p, a.workdir, variants)
    write_json(cost_path(a.workdir), cost)
    print(json.dumps(cost, indent=1))
  if a.dry_run or a.measure:
    print(plan_text(p, runs, a.workdir, load_cost(a.workdir)))
    return 0
  if a.jobs < 1:
    raise SystemExit(f"--jobs={a.jobs}: expected >= 1")
  errors: list[str] = []
  if not a.aggregate_only:
    t0 = time.time()
    if a.jobs > 1:
      errors = run_jobs(a, argv, p, runs)
    else:
      errors = run_all(p, runs, a.workdir, shard, a.stop_after_h * 3600)
    _log(f"finished in {time.time() - t0:.0f} s, {len(errors)} failed")
    for e in errors:
      _log(f"failed: {e}")
  if a.no_report:
    return 1 if errors else 0
  from benchmarks import ablation_v2_report  # pylint: disable=g-import-not-at-top

  body = ablation_v2_report.write_report(p, a.workdir, runs, families, variants, a)
  if a.results_md:
    ablation_v2_report.write_section(a.results_md, body)
    _log(f"wrote the table section into {a.results_md}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
