"""Issue #6's ablation table: 9 models x 2 synthetic benchmarks x seeds, RRS and all-frames.

  python -m benchmarks.ablation [--protocol=v1|v2] [--seeds=0,1,2] [--models=baseline,...] [--benches=distractors,clean]
      [--workdir=workdir/ablation] [--jobs=N] [--dry-run] [--aggregate-only]
      [--results-md=docs/RESULTS.md]

`--protocol=v2` hands every other flag to `benchmarks.ablation_v2` (issue 17's protocol: a
pretrained trunk, 128x64, one distractor family at a time, memory statistics, t intervals).

Every run is two subprocesses of this tree's `main.py` (printed, so a row can be rerun by hand):
  1. `python main.py --config=configs/synthetic.py:<model>,ablation --workdir=W
     --config.seed=<k> --config.dataset.root=<root> [clean knobs] --config.eval.sampling=rrs`
     trains, selects the best checkpoint on held-out training ids, evaluates it on the test split
     with RRS clips and writes `W/results.json` (copied to `W/results_rrs.json`);
  2. the same with `--mode=eval --config.eval.sampling=all_frames` evaluates that best checkpoint
     with all-frames clips (eval mode overwrites `W/results.json`: it is copied to
     `W/results_all_frames.json` and the training summary is put back).
`W = <workdir>/<bench>/<model>/seed<k>`; `W/ablation_run.json` records both commands, their
wall times and the load averages around them. Resumable: a finished stage is skipped (training
when `W/results.json` or `W/results_rrs.json` exists, evaluation when
`W/results_all_frames.json` exists), and an interrupted training resumes from its checkpoints.

Benchmarks (each generated once, before any run, into `<workdir>/data/<bench>`, deterministic):
`distractors` = the synthetic default knobs at 64x32 (`ablation` word); `clean` = the same
identities and tracklets with every distractor off (`CLEAN_KNOBS`: the four temporal
distractors' `_prob`, the per-camera clutter and the illumination cast at 0).

All runs share a persistent XLA compilation cache in `<workdir>/jax_cache`, so only the first
run of each model compiles. `--jobs=2` runs two processes at once, each limited to one XLA /
TF thread. After a run's evaluations its `checkpoints/` folder is deleted when it has a non-empty
`best/` checkpoint (which, with the TensorBoard events, logs and results, stays), except for the runs in
`KEEP_ALL`.

Finally the results are aggregated (mean and sample std, n-1, over seeds, in percent), printed
as a markdown table, written to `<workdir>/summary.json` and between the `<!-- ablation:begin
-->` / `<!-- ablation:end -->` markers of `--results-md`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Table order (paper Table 1: baseline, memories without / with the spread loss, then others).
MODELS = ("baseline", "sm_nospread", "sm", "tm_nospread", "tm", "stmn_nospread", "stmn",
          "drsa", "sta")
BENCHES = ("distractors", "clean")
SAMPLINGS = ("rrs", "all_frames")
SAMPLING_LABELS = {"rrs": "RRS", "all_frames": "all frames"}
METRICS = ("R1", "R5", "mAP", "mINP")
CONFIG_WORD = "ablation"
# Every distractor of data_pipelines/synthetic/spec.py off; identities, tracklets, cameras,
# sensor noise and the pid-0 gallery distractor tracklets stay as they are.
CLEAN_KNOBS: dict[str, float] = {
    "clutter_strength": 0.0,
    "clutter_density": 0.0,
    "illumination_strength": 0.0,
    "occlusion_prob": 0.0,
    "exit_prob": 0.0,
    "misalign_prob": 0.0,
    "intruder_prob": 0.0,
}
BENCH_KNOBS: dict[str, dict[str, float]] = {"distractors": {}, "clean": CLEAN_KNOBS}
# These runs go first and keep every checkpoint (the figures of --mode=visualize read them).
KEEP_ALL = (("distractors", "stmn", 0), ("distractors", "stmn_nospread", 0))
# The clean control's order: the four Table-1 corner models first (a late cut drops the rest).
CLEAN_ORDER = ("baseline", "sm", "tm", "stmn", "sm_nospread", "tm_nospread", "stmn_nospread",
               "drsa", "sta")
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


@dataclasses.dataclass(frozen=True)
class Run:
  bench: str
  model: str
  seed: int

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.bench, self.model, f"seed{self.seed}")


# ------------------------------------------------------------------------------ planning
def plan_runs(models: Sequence[str], benches: Sequence[str], seeds: Sequence[int]) -> list[Run]:
  """The run order: `KEEP_ALL` first, then distractors (seed-major), then clean (model-major)."""
  runs: list[Run] = [Run(b, m, s) for b, m, s in KEEP_ALL
                     if b in benches and m in models and s in seeds]
  if "distractors" in benches:
    runs += [Run("distractors", m, s) for s in seeds for m in models]
  if "clean" in benches:
    order = [m for m in CLEAN_ORDER if m in models] + [m for m in models if m not in CLEAN_ORDER]
    runs += [Run("clean", m, s) for m in order for s in seeds]
  unique: list[Run] = []
  for r in runs:
    if r not in unique:
      unique.append(r)
  return unique


def data_root(workdir: str, bench: str) -> str:
  return os.path.join(os.path.abspath(workdir), "data", bench)


def config_args(run: Run, workdir: str) -> list[str]:
  """main.py flags shared by both stages of a run."""
  args = [f"--config=configs/synthetic.py:{run.model},{CONFIG_WORD}",
          f"--workdir={run.workdir(os.path.abspath(workdir))}",
          f"--config.seed={run.seed}",
          f"--config.dataset.root={data_root(workdir, run.bench)}"]
  args += [f"--config.dataset.synthetic.{k}={v}" for k, v in BENCH_KNOBS[run.bench].items()]
  return args


def train_command(run: Run, workdir: str) -> list[str]:
  return ["python", "main.py", *config_args(run, workdir), "--config.eval.sampling=rrs"]


def eval_command(run: Run, workdir: str) -> list[str]:
  return ["python", "main.py", "--mode=eval", *config_args(run, workdir),
          "--config.eval.sampling=all_frames"]


def shell(cmd: Sequence[str]) -> str:
  """The command as one shell line, paths inside the repository shown relative to its root."""
  return " ".join(shlex.quote(c.replace(REPO + os.sep, "")) for c in cmd)


def subprocess_env(workdir: str, jobs: int) -> dict[str, str]:
  """Environment of every run: shared compilation cache; one thread each when jobs > 1."""
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.abspath(workdir), "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  env.pop("JAX_PLATFORMS", None)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if jobs > 1:
    flags.append("--xla_cpu_multi_thread_eigen=false")
    env["TF_NUM_INTRAOP_THREADS"] = "1"
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


# ------------------------------------------------------------------------------ running
def bench_knobs(bench: str) -> dict[str, Any]:
  """The generator knobs of a benchmark (the `ablation` word's, plus `BENCH_KNOBS[bench]`)."""
  sys.path.insert(0, REPO)
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  knobs = synthetic.get_config(CONFIG_WORD).dataset.synthetic.to_dict()
  unknown = sorted(set(BENCH_KNOBS[bench]) - set(knobs))
  if unknown:
    raise ValueError(f"benchmark {bench!r}: unknown synthetic knobs {unknown}")
  knobs.update(BENCH_KNOBS[bench])
  return knobs


def generate_benchmarks(benches: Iterable[str], workdir: str) -> None:
  """Generates each benchmark once (a no-op when its spec.json already matches)."""
  from data_pipelines import synthetic as synth  # pylint: disable=g-import-not-at-top

  for bench in benches:
    t0 = time.time()
    root = synth.ensure_generated(data_root(workdir, bench), bench_knobs(bench))
    print(f"[ablation] benchmark {bench}: {root} ({time.time() - t0:.1f} s)", flush=True)


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


_print_lock = threading.Lock()


def _log(msg: str) -> None:
  with _print_lock:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stage(cmd: list[str], log_path: str, env: Mapping[str, str]) -> dict:
  """Runs one main.py subprocess from the repo root; returns its timing record."""
  load0, t0 = os.getloadavg(), time.time()
  with open(log_path, "a") as log:
    log.write(f"\n$ {shell(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                          check=False)
  seconds = time.time() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"exit code {proc.returncode} after {seconds:.0f} s: {shell(cmd)} "
                       f"(log: {log_path})")
  return {"command": shell(cmd), "seconds": seconds, "loadavg_before": list(load0),
          "loadavg_after": list(os.getloadavg()), "started": t0, "ended": t0 + seconds}


def run_one(run: Run, workdir: str, env: Mapping[str, str], keep_all: bool) -> dict:
  """Trains + evaluates one run (skipping finished stages); returns its `ablation_run.json`."""
  w = run.workdir(os.path.abspath(workdir))
  os.makedirs(w, exist_ok=True)
  record_path = os.path.join(w, "ablation_run.json")
  record = _read_json(record_path) or {}
  record.update(bench=run.bench, model=run.model, seed=run.seed)
  results = os.path.join(w, "results.json")
  rrs_path = os.path.join(w, "results_rrs.json")
  all_path = os.path.join(w, "results_all_frames.json")
  if not os.path.exists(rrs_path):
    if not os.path.exists(results):
      cmd = train_command(run, workdir)
      _log(f"train {run}: {shell(cmd)}")
      record["train"] = _stage(cmd, os.path.join(w, "train.log"), env)
      _log(f"train {run} done in {record['train']['seconds']:.0f} s")
      _write_json(record_path, record)
    summary = _read_json(results)
    if not summary or "test" not in summary or summary.get("mode") == "eval":
      raise RuntimeError(f"{results}: no training summary with test results")
    shutil.copyfile(results, rrs_path)
  if not os.path.exists(all_path):
    cmd = eval_command(run, workdir)
    _log(f"eval {run}: {shell(cmd)}")
    record["eval_all_frames"] = _stage(cmd, os.path.join(w, "eval_all_frames.log"), env)
    _log(f"eval {run} done in {record['eval_all_frames']['seconds']:.0f} s")
    summary = _read_json(results)
    if not summary or summary.get("mode") != "eval" or "test" not in summary:
      raise RuntimeError(f"{results}: eval mode wrote no test results")
    shutil.copyfile(results, all_path)
    shutil.copyfile(rrs_path, results)  # results.json = the training summary again
  record["done"] = True
  _write_json(record_path, record)
  best = os.path.join(w, "best")
  if not keep_all and os.path.isdir(best) and os.listdir(best):  # the evaluated model stays
    shutil.rmtree(os.path.join(w, "checkpoints"), ignore_errors=True)
  return record


def run_all(runs: Sequence[Run], workdir: str, jobs: int) -> list[str]:
  """Runs every run (`jobs` at a time, in order); returns the error messages."""
  env = subprocess_env(workdir, jobs)
  errors: list[str] = []
  keep = {Run(*k) for k in KEEP_ALL}

  def work(r: Run) -> None:
    try:
      run_one(r, workdir, env, keep_all=r in keep)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{r}: {e}")
      _log(f"FAILED {r}: {e}")

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
    list(pool.map(work, runs))
  return errors


# ------------------------------------------------------------------------------ aggregation
def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1; NaN for fewer than 2 values)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def collect(workdir: str, models: Sequence[str], benches: Sequence[str],
            seeds: Sequence[int]) -> list[dict]:
  """One record per finished run: bench, model, seed, metrics per sampling (%), seconds."""
  out = []
  for bench in benches:
    for model in models:
      for seed in seeds:
        w = Run(bench, model, seed).workdir(workdir)
        res = {s: _read_json(os.path.join(w, f"results_{s}.json")) for s in SAMPLINGS}
        if any(r is None or "test" not in r for r in res.values()):
          continue
        rec = _read_json(os.path.join(w, "ablation_run.json")) or {}
        stages = [rec.get(k) for k in ("train", "eval_all_frames")]
        seconds = sum(s["seconds"] for s in stages if s) if all(stages) else None
        loads = [s[k][0] for s in stages if s for k in ("loadavg_before", "loadavg_after")]
        out.append({
            "bench": bench, "model": model, "seed": seed,
            "metrics": {s: {m: 100.0 * float(res[s]["test"][m]) for m in METRICS}
                        for s in SAMPLINGS},
            "seconds": seconds, "load1": loads,
            "commands": [s["command"] for s in stages if s],
            "test_checkpoint": res["rrs"].get("test_checkpoint", "?"),
            "started": min((s["started"] for s in stages if s and "started" in s), default=None),
            "ended": max((s["ended"] for s in stages if s and "ended" in s), default=None),
        })
  return out


def aggregate(records: Sequence[dict]) -> dict:
  """{bench: {model: {n, seeds, seconds_mean, <sampling>: {metric: {mean, std, values}}}}}."""
  out: dict[str, dict[str, dict]] = {}
  for r in records:
    out.setdefault(r["bench"], {}).setdefault(r["model"], []).append(r)
  summary: dict[str, dict[str, dict]] = {}
  for bench, by_model in out.items():
    summary[bench] = {}
    for model, recs in by_model.items():
      recs = sorted(recs, key=lambda r: r["seed"])
      row: dict[str, Any] = {"n": len(recs), "seeds": [r["seed"] for r in recs]}
      for s in SAMPLINGS:
        row[s] = {}
        for m in METRICS:
          vals = [r["metrics"][s][m] for r in recs]
          mean, std = mean_std(vals)
          row[s][m] = {"mean": mean, "std": std, "values": vals}
      secs = [r["seconds"] for r in recs if r["seconds"] is not None]
      row["seconds_mean"] = sum(secs) / len(secs) if secs else None
      row["seconds_total"] = sum(secs) if secs else None
      summary[bench][model] = row
  return summary


def paired_differences(records: Sequence[dict], sampling: str, metric: str,
                       pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]]) -> list[dict]:
  """For each ((bench_a, model_a), (bench_b, model_b)): a - b per common seed, mean and std."""
  value = {(r["bench"], r["model"], r["seed"]): r["metrics"][sampling][metric] for r in records}
  out = []
  for a, b in pairs:
    seeds = sorted(k for (bb, mm, k) in value if (bb, mm) == a and (b[0], b[1], k) in value)
    diffs = [value[(*a, k)] - value[(*b, k)] for k in seeds]
    mean, std = mean_std(diffs)
    out.append({"a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean": mean, "std": std})
  return out


def difference_table(records: Sequence[dict], models: Sequence[str],
                     benches: Sequence[str]) -> str:
  """Markdown: each model minus the baseline, with minus without the spread loss, both memories
  minus one (same bench, same seed), and distractors minus clean (same model, same seed), for
  all-frames mAP and R1 and RRS mAP."""
  cols = [("all_frames", "mAP"), ("all_frames", "R1"), ("rrs", "mAP")]
  head = ["difference"] + [f"{SAMPLING_LABELS[s]} {m}" for s, m in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows: list[tuple[str, tuple[str, str], tuple[str, str]]] = []
  extra = [("sm", "sm_nospread"), ("tm", "tm_nospread"), ("stmn", "stmn_nospread"),
           ("stmn", "sm"), ("stmn", "tm"), ("stmn_nospread", "sm_nospread"),
           ("stmn_nospread", "tm_nospread")]  # spread loss; the second memory on top of one
  for bench in benches:
    rows += [(f"{bench}: `{m}` - `baseline`", (bench, m), (bench, "baseline"))
             for m in models if m != "baseline"]
    rows += [(f"{bench}: `{a}` - `{b}`", (bench, a), (bench, b))
             for a, b in extra if a in models and b in models]
  if "distractors" in benches and "clean" in benches:
    rows += [(f"`{m}`: distractors - clean", ("distractors", m), ("clean", m)) for m in models]
  for label, a, b in rows:
    cells = []
    for s, m in cols:
      d = paired_differences(records, s, m, [(a, b)])[0]
      cells.append(f"{fmt_cell(d['mean'], d['std'])} (n={len(d['seeds'])})"
                   if d["seeds"] else "-")
    if any(c != "-" for c in cells):
      lines.append("| " + " | ".join([label, *cells]) + " |")
  return "\n".join(lines)


def fmt_cell(mean: float, std: float) -> str:
  if math.isnan(mean):
    return "-"
  if math.isnan(std):
    return f"{mean:.1f}"
  return f"{mean:.1f} ± {std:.1f}"


def fmt_seconds(s: float | None) -> str:
  if s is None:
    return "-"
  return f"{s / 60:.1f} min" if s >= 600 else f"{s:.0f} s"


def markdown_table(summary: Mapping[str, Mapping[str, dict]], bench: str,
                   models: Sequence[str]) -> str:
  """One benchmark's rows: model, n, RRS R1/R5/mAP/mINP, all-frames ..., wall time per run."""
  head = ["model", "n"] + [f"{SAMPLING_LABELS[s]} {m}" for s in SAMPLINGS for m in METRICS]
  head.append("wall / run")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows = summary.get(bench, {})
  for model in models:
    if model not in rows:
      continue
    row = rows[model]
    cells = [f"`{model}`", str(row["n"])]
    cells += [fmt_cell(row[s][m]["mean"], row[s][m]["std"]) for s in SAMPLINGS for m in METRICS]
    cells.append(fmt_seconds(row["seconds_mean"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def machine_line(loads: Sequence[float] = ()) -> str:
  model = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  text = f"{os.cpu_count()} CPU cores (`nproc` {os.cpu_count()}), {model}, {platform.system()}"
  if loads:
    text += (f"; 1-min load average at run starts/ends: min {min(loads):.1f}, "
             f"mean {sum(loads) / len(loads):.1f}, max {max(loads):.1f}")
  return text


def row_commands(run: Run, workdir: str) -> str:
  return f"{shell(train_command(run, workdir))}\n{shell(eval_command(run, workdir))}"


def render(records: Sequence[dict], models: Sequence[str], benches: Sequence[str],
           seeds: Sequence[int], workdir: str, commit: str, jobs: int) -> str:
  """The markdown between the markers: tables, totals, machine, commands."""
  summary = aggregate(records)
  loads = [x for r in records for x in r["load1"]]
  secs = [r["seconds"] for r in records if r["seconds"] is not None]
  seed_arg = ",".join(map(str, seeds))
  parts = [
      f"Generated by `python -m benchmarks.ablation --seeds={seed_arg} "
      f"--models={','.join(models)} --benches={','.join(benches)} --workdir={workdir} "
      f"--jobs={jobs}` from commit `{commit}`.",
      "",
      "Test split of the synthetic benchmark (40 test ids, pid-0 distractor tracklets in the "
      "gallery); values in percent, mean ± sample standard deviation (n - 1) over the `n` "
      f"seeds ({seed_arg}: `config.seed`: model initialisation, batch sampling, augmentation "
      "and, with validation ids, which ids are held out; the benchmark is fixed). Each run's model is evaluated twice: RRS (one clip of L frames "
      "per tracklet) and all frames (every clip of the tracklet, embeddings averaged), both "
      "with flip averaging. Evaluated checkpoint: "
      f"{', '.join(sorted({r.get('test_checkpoint', '?') for r in records})) or '-'}. "
      "Wall time per run = training + both evaluations, compilation included (cached after "
      "the first run of a model).",
      "",
  ]
  for bench in benches:
    title = {"distractors": "Distractors on (default knobs)",
             "clean": "Control: distractors off (clutter, illumination, occlusion, exit, "
                      "misalignment, intruders)"}.get(bench, bench)
    parts += [f"### {title}", "", markdown_table(summary, bench, models), ""]
  parts += [
      "### Paired differences",
      "",
      "Differences in points, computed per seed (a seed fixes the batch sampling and the "
      "augmentation; the initialisation differs with the architecture) and then averaged; ± is "
      "the sample std of the per-seed "
      "differences. A difference smaller than about its std is not distinguishable from seed "
      "noise with n = 3.",
      "",
      difference_table(records, models, benches),
      "",
  ]
  starts = [r["started"] for r in records if r.get("started")]
  ends = [r["ended"] for r in records if r.get("ended")]
  elapsed = (f", {fmt_seconds(max(ends) - min(starts))} from the first start to the last end"
             if starts and ends else "")
  parts += [
      f"Wall time: the sum over the {len(records)} runs is "
      f"{fmt_seconds(sum(secs)) if secs else '-'}"
      f" ({'one run at a time' if jobs <= 1 else f'{jobs} runs at a time'}{elapsed}).",
      "",
      f"Machine: {machine_line(loads)}. The machine was shared with other jobs during the run, "
      "so wall times are inflated by the load shown.",
      "",
      "Commands (from the repository root; the runner sets `JAX_COMPILATION_CACHE_DIR="
      f"{workdir}/jax_cache`, `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`). One row = these "
      "two commands for each seed `k`; the first trains and writes the RRS numbers, the second "
      "evaluates the same checkpoint (best on validation, else final) with all frames:",
      "",
      "```sh",
  ]
  for bench in benches:
    for model in models:
      parts.append(f"# {bench} / {model}")
      parts.append(row_commands(Run(bench, model, 0), workdir).replace("seed0", "seed<k>")
                   .replace("--config.seed=0", "--config.seed=<k>"))
  parts += ["```"]
  return "\n".join(parts)


def write_markers(path: str, body: str, title: str = "# Results") -> None:
  """Replaces the text between the markers of `path` (created, or markers appended, if absent)."""
  block = f"{BEGIN}\n{body}\n{END}"
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    text = text[:start] + block + text[stop:]
  elif BEGIN in text or END in text:
    raise ValueError(f"{path}: only one of the markers {BEGIN} / {END} (or in the wrong order)")
  else:
    text = (text.rstrip() + "\n\n" if text.strip() else f"{title}\n\n") + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def summary_json(records: Sequence[dict], commit: str) -> dict:
  secs = [r["seconds"] for r in records if r["seconds"] is not None]
  return {"commit": commit, "std": "sample standard deviation (n - 1)", "units": "percent",
          "metrics": list(METRICS), "samplings": list(SAMPLINGS),
          "machine": machine_line([x for r in records for x in r["load1"]]),
          "total_seconds": sum(secs), "runs": list(records), "table": aggregate(records)}


def current_commit() -> str:
  """This tree's commit: `git rev-parse HEAD`, else a COMMIT file (frozen `git archive` copy)."""
  try:
    out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True, timeout=10)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    with open(os.path.join(REPO, "COMMIT")) as f:
      return f.read().strip()
  except OSError:
    return "unknown"


# ------------------------------------------------------------------------------ CLI
def _names(text: str, valid: Sequence[str], flag: str) -> list[str]:
  names = [w.strip() for w in text.split(",") if w.strip()]
  bad = [n for n in names if n not in valid]
  if bad or not names:
    raise SystemExit(f"--{flag}={text!r}: expected a comma list of {', '.join(valid)}")
  return names


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  protocol = [x for x in argv if x.startswith("--protocol")]
  if protocol:  # --protocol=v1 (this table, default) or v2 (issue 17: benchmarks.ablation_v2)
    value = protocol[-1].partition("=")[2]
    if value not in ("v1", "v2"):
      raise SystemExit(f"{protocol[-1]!r}: expected --protocol=v1 or --protocol=v2")
    argv = [x for x in argv if not x.startswith("--protocol")]
    if value == "v2":
      from benchmarks import ablation_v2  # pylint: disable=g-import-not-at-top

      return ablation_v2.main(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--benches", default=",".join(BENCHES))
  p.add_argument("--workdir", default="workdir/ablation")
  p.add_argument("--jobs", type=int, default=1)
  p.add_argument("--results-md", default=os.path.join(REPO, "docs", "RESULTS.md"))
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table")
  p.add_argument("--commit", default="", help="commit named in the table (default: this tree's; "
                 "give the frozen copy's when aggregating its runs from another tree)")
  a = p.parse_args(argv)
  try:
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  except ValueError:
    raise SystemExit(f"--seeds={a.seeds!r}: expected a comma list of integers") from None
  if not seeds:
    raise SystemExit("--seeds: expected at least one seed")
  models = _names(a.models, MODELS, "models")
  benches = _names(a.benches, BENCHES, "benches")
  if a.jobs < 1:
    raise SystemExit(f"--jobs={a.jobs}: expected >= 1")
  runs = plan_runs(models, benches, seeds)
  workdir = a.workdir
  commit = a.commit or current_commit()
  if a.dry_run:
    for r in runs:
      print(f"# {r.bench} {r.model} seed{r.seed}\n{row_commands(r, workdir)}")
    return 0
  t0 = time.time()
  if not a.aggregate_only:
    _log(f"{len(runs)} runs, jobs={a.jobs}, commit {commit}, workdir {os.path.abspath(workdir)}")
    generate_benchmarks(benches, workdir)
    errors = run_all(runs, workdir, a.jobs)
    _log(f"all runs finished in {time.time() - t0:.0f} s, {len(errors)} failed")
    for e in errors:
      _log(f"failed: {e}")
  records = collect(workdir, models, benches, seeds)
  body = render(records, models, benches, seeds, workdir, commit, a.jobs)
  print(body)
  _write_json(os.path.join(workdir, "summary.json"), summary_json(records, commit))
  write_markers(a.results_md, body)
  _log(f"wrote {os.path.join(workdir, 'summary.json')} and {a.results_md}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
