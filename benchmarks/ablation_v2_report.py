"""Ablation v2 (issue 17): the table, figures and the docs/RESULTS.md section from the runs.

`write_report` reads every finished run's `result.json` and `memory_stats.json` and writes to
`<workdir>/results/`: `table.md` (the section), `summary.json` (every per-run value and every
interval), `memory_<family>.png` (the memory statistics over training, seed 0 of each variant,
`ablation_v2_memory.stats_figure`) and, unless `--no_figures`, the paper figures of
`--mode=visualize` (`stmn_jax.visualize.visualize_mode`) for each family's `stmn` run at the
first seed beside `stmn_nospread`, copied to `figures/<family>/`. `write_section` puts the
section between the `<!-- ablation-v2:begin -->` / `end` markers of docs/RESULTS.md (after its
title when the markers are absent).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Any, Sequence

from etils import epath

from benchmarks import ablation_v2 as v2
from benchmarks import ablation_v2_stats as st


def _commit() -> str:
  try:
    return subprocess.run(["git", "-C", v2.REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def command(a: Any) -> str:
  """The command line that regenerates the table (the arguments of this invocation)."""
  parts = ["python -m benchmarks.ablation --protocol=v2", f"--size={a.size}",
           f"--families={a.families}", f"--variants={a.variants}", f"--seeds={a.seeds}",
           f"--workdir={a.workdir}"]
  for flag in ("steps", "stats_every", "pretrain_steps", "lr", "decay_at"):
    if getattr(a, flag, 0):
      parts.append(f"--{flag}={getattr(a, flag)}")
  if a.results_md:
    parts.append(f"--results_md={v2.shown_path(a.results_md)}")
  if getattr(a, "figures_dir", ""):
    parts.append(f"--figures_dir={v2.shown_path(a.figures_dir)}")
  return " ".join(shlex.quote(x) if " " not in x else x for x in parts)


def stats_series(root: str, run: v2.Run) -> list[dict]:
  log = v2.read_json(v2.wpath(run.workdir(root), "memory_stats.json")) or {}
  return sorted(log.get("records", []), key=lambda r: r["step"])


def paper_figures(p: v2.Protocol, root: str, family: str, seed: int, out: str) -> dict:
  """--mode=visualize of `family`'s stmn run (beside stmn_nospread) -> PNGs under `out`."""
  from stmn_jax import visualize  # pylint: disable=g-import-not-at-top

  a, b = v2.Run(family, "stmn", seed), v2.Run(family, "stmn_nospread", seed)
  if not epath.Path(a.workdir(root), "result.json").exists():
    return {}
  compare = b.workdir(root) if epath.Path(b.workdir(root), "result.json").exists() else None
  config = v2.run_config(p, a, root, v2.trunk_path(root))
  res = visualize.visualize_mode(config, a.workdir(root), compare_workdir=compare)
  dst = epath.Path(out) / family
  dst.mkdir(parents=True, exist_ok=True)
  copied = {}
  for name, png in res["figures"].items():
    target = dst / os.path.basename(png)
    epath.Path(png).copy(target, overwrite=True)
    copied[name] = os.fspath(target)
  return copied


def write_report(p: v2.Protocol, root: str, runs: Sequence[v2.Run], families: Sequence[str],
                 variants: Sequence[str], a: Any) -> str:
  """Writes `<root>/results/` (see the module docstring); returns the markdown section."""
  from benchmarks import ablation_v2_memory as mem  # pylint: disable=g-import-not-at-top

  out = epath.Path(root).resolve() / "results"
  out.mkdir(parents=True, exist_ok=True)
  records = v2.collect(root, runs)
  seeds = sorted({r.seed for r in runs})
  figs: dict[str, Any] = {}
  for f in families:
    series = {v: stats_series(root, v2.Run(f, v, seeds[0])) for v in variants}
    series = {v: s for v, s in series.items() if s}
    if series:
      figs[f"memory_{f}"] = mem.stats_figure(os.fspath(out / f"memory_{f}.png"), series,
                                             f"{f}: memory statistics over training, seed "
                                             f"{seeds[0]}")
    if not getattr(a, "no_figures", False) and f != "none":
      try:  # a figure failure must not cost the table
        figs[f"paper_{f}"] = paper_figures(p, root, f, seeds[0], os.fspath(out / "figures"))
      except Exception as e:  # pylint: disable=broad-except
        print(f"[ablation-v2] figures of {f} failed: {e!r}", flush=True)
        figs[f"paper_{f}"] = {}
  if getattr(a, "figures_dir", ""):
    figs = copy_figures(figs, a.figures_dir)
  body = render(p, records, families, variants, runs, a, figs)
  (out / "table.md").write_text(body + "\n")
  intervals = {f: {f"{x}-{y}": st.paired(records, f, x, y) for x, y in v2.PAIRS}
               for f in families}
  v2.write_json(os.fspath(out / "summary.json"),
                {"commit": _commit(), "command": command(a), "runs": records,
                 "intervals": intervals, "figures": figs})
  print(body, flush=True)
  return body


def copy_figures(figs: dict, dest: str) -> dict:
  """Copies every figure of `figs` under `dest` (the memory statistics as `memory_<family>.png`,
  the paper figures as `<family>/<name>.png`); returns `figs` with the copies' paths."""
  root = epath.Path(dest).resolve()
  copied: dict[str, Any] = {}
  for name, fig in figs.items():
    if isinstance(fig, str):
      target = root / os.path.basename(fig)
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(fig).copy(target, overwrite=True)
      copied[name] = os.fspath(target)
    elif fig:
      family = name.partition("_")[2]
      (root / family).mkdir(parents=True, exist_ok=True)
      copied[name] = {}
      for key, png in fig.items():
        target = root / family / os.path.basename(png)
        epath.Path(png).copy(target, overwrite=True)
        copied[name][key] = os.fspath(target)
    else:
      copied[name] = fig
  return copied


def _figure_lines(figs: dict, a: Any) -> list[str]:
  """The figure list of the section: with `--figures_dir` and `--results_md`, the memory
  statistics shown as images and the paper figures linked, relative to the markdown file."""
  md_dir = os.path.dirname(os.path.abspath(a.results_md)) if a.results_md else ""
  if not (md_dir and getattr(a, "figures_dir", "")):
    lines = []
    for name, fig in figs.items():
      if isinstance(fig, str):
        lines.append(f"- `{name}`: `{v2.shown_path(fig)}`")
      elif fig:
        lines.append(f"- `{name}`: " + ", ".join(f"`{v2.shown_path(x)}`" for x in fig.values()))
    return lines
  rel = lambda x: os.path.relpath(os.path.abspath(x), md_dir)  # pylint: disable=unnecessary-lambda-assignment
  lines = []
  for name, fig in figs.items():
    if isinstance(fig, str):
      lines += [f"![{name}]({rel(fig)})", ""]
  for name, fig in figs.items():
    if isinstance(fig, dict) and fig:
      lines.append(f"- `{name}` (`--mode=visualize` of the `stmn` run, first seed, beside "
                   "`stmn_nospread` where it ran): " + ", ".join(f"[{os.path.basename(x)}]({rel(x)})"
                                                for x in fig.values()))
  return lines


def render(p: v2.Protocol, records: Sequence[dict], families: Sequence[str],
           variants: Sequence[str], runs: Sequence[v2.Run], a: Any, figs: dict) -> str:
  secs = [r["seconds"] for r in records]
  queries = sorted({r["num_query"] for r in records})
  lines = [
      f"Generated by `{command(a)}` from commit `{_commit()}`: {len(records)} of {len(runs)} "
      f"runs finished, {sum(secs) / 3600:.2f} h of run time in all.",
      "",
      f"Test mAP (%), all-frames clips with flip averaging, {', '.join(map(str, queries))} "
      f"queries; mean ± sample sd over seeds (n). Every run: {p.steps} steps from the "
      f"pretrained trunk at {p.height}x{p.width}, last stride {p.last_stride}.",
      "",
      st.main_table(records, families, variants),
      "",
      "Paired differences (points; same seed = same trunk, benchmark, batches and "
      "augmentation), mean [95% t interval over seeds]; `*`: the interval excludes 0.",
      "",
      st.difference_table(records, families, v2.PAIRS),
      "",
      "Seed sd of each paired difference and the seeds needed to resolve 2 points (95% "
      "interval excluding 0 with 80% power) at that sd (`ablation_v2_stats.required_seeds`):",
      "",
      st.needed_table(records, families, v2.PAIRS),
      "",
      "Memory statistics at the end of training (mean over seeds; entropies as fractions of "
      "the uniform one; contrast in uniform frame shares, > 0 = distractor frames "
      "down-weighted). Settled: every statistic, over the last "
      f"{v2.SETTLE_WINDOW:.0%} of training, within {v2.SETTLE_REL:.0%} of its whole movement "
      f"(or the floors {v2.SETTLE_TOL}) of its final value; moved: some statistic at least "
      f"{v2.MOVED} away from its step-0 value (pretrained trunk, fresh memories):",
      "",
      st.memory_table(records, families, variants),
      "",
  ]
  lines += _figure_lines(figs, a)
  return "\n".join(lines).rstrip()


def write_section(path: str, body: str) -> None:
  """Replaces the text between the v2 markers of `path`; without markers, inserts the block
  right after the first line (the title)."""
  block = f"{v2.BEGIN}\n{body}\n{v2.END}"
  p = epath.Path(path)
  text = p.read_text() if p.exists() else "# Results\n"
  if v2.BEGIN in text and v2.END in text and text.index(v2.BEGIN) < text.index(v2.END):
    start, stop = text.index(v2.BEGIN), text.index(v2.END) + len(v2.END)
    text = text[:start] + block + text[stop:]
  elif v2.BEGIN in text or v2.END in text:
    raise ValueError(f"{path}: only one of the markers {v2.BEGIN} / {v2.END} (or misordered)")
  else:
    head, _, rest = text.partition("\n")
    text = f"{head}\n\n{block}\n{rest}"
  p.write_text(text)
