"""`python -m data_pipelines.synthetic --out=DIR [--layout=mars|dukev] [--knob=value ...]`.

Generates the benchmark into DIR (atomically; reuses DIR when its spec.json records the same
knobs, unless --force) and prints a summary: ids, tracklets, frames and cameras per part, and
the seconds taken. `--list` prints the knobs with their defaults.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

from data_pipelines.synthetic import generator
from data_pipelines.synthetic import spec as spec_lib

USAGE = ("usage: python -m data_pipelines.synthetic --out=DIR [--layout=mars|dukev] "
         "[--force] [--json] [--list] [--<knob>=<value> ...]")


def parse_args(argv: Sequence[str]) -> tuple[dict, dict]:
  """argv -> (options {out, force, json, list}, knob overrides). Unknown knobs raise."""
  options = {"out": None, "force": False, "json": False, "list": False}
  knobs: dict[str, str] = {}
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith("--"):
      raise ValueError(f"unexpected argument {arg!r}; {USAGE}")
    name, eq, value = arg[2:].partition("=")
    name = name.replace("-", "_")
    if name in ("force", "json", "list", "help", "h"):
      options[name if name != "h" else "help"] = True
      i += 1
      continue
    if not eq:
      if i + 1 >= len(args):
        raise ValueError(f"--{name} needs a value")
      value = args[i + 1]
      i += 1
    i += 1
    if name == "out":
      options["out"] = value
    else:
      knobs[name] = value
  spec_lib.make_spec(**knobs)  # unknown names and bad values fail here, naming the knob
  return options, knobs


def format_summary(summary: dict) -> str:
  lines = [f"synthetic benchmark ({summary['layout']} layout) at {summary.get('root', '?')}",
           f"  {'part':<8} {'ids':>5} {'tracklets':>10} {'frames':>8} {'cameras':>8}"]
  for part in ("train", "query", "gallery"):
    c = summary["splits"][part]
    lines.append(f"  {part:<8} {c['ids']:>5} {c['tracklets']:>10} {c['frames']:>8} "
                 f"{c['cameras']:>8}")
  lines.append(f"  distractor (pid 0) tracklets: {summary['distractor_tracklets']}, "
               f"junk (pid -1) tracklets: {summary['junk_tracklets']}, "
               f"frames written: {summary['total_frames']}")
  flagged = summary.get("flagged", {})
  if flagged:
    lines.append("  distractors (tracklets / frames): " + ", ".join(
        f"{f} {flagged['tracklets'][f]} / {flagged['frames'][f]}" for f in flagged["frames"]))
  if "seconds" in summary:
    lines.append(f"  seconds: {summary['seconds']:.2f}"
                 + (" (reused an existing dataset)" if summary.get("reused") else ""))
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  try:
    options, knobs = parse_args(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if options.get("help"):
    print(USAGE)
    return 0
  if options["list"]:
    for name, value in spec_lib.defaults().items():
      print(f"--{name}={value}")
    return 0
  if not options["out"]:
    print(f"error: --out is required; {USAGE}", file=sys.stderr)
    return 2
  start = time.perf_counter()
  before = generator.read_spec(options["out"])
  root = generator.ensure_generated(options["out"], knobs, force=options["force"])
  record = generator.read_spec(root)
  summary = dict(record["summary"], root=root, seconds=time.perf_counter() - start,
                 reused=bool(before is not None and record == before and not options["force"]))
  print(json.dumps(summary, indent=1, sort_keys=True) if options["json"]
        else format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
