"""Summary of a dataset as the readers see it.

    python -m data_pipelines.inspect --dataset=mars --root=DIR [--protocol=official|torchreid]
        [--split-id N] [--no-distractors] [--json] [--verify [--frame-check-cache DIR|none]]
        [--check-files=size|exists|none]
    python -m data_pipelines.inspect --dataset=prid2011 --root=DIR --make-splits SEED
        [--min-frames 27] [--splits-mat PATH]

Prints a table of ids / tracklets / frames / cameras per part and the number of queries without
a valid gallery match; with `--json`, exactly one JSON object (`Split.summary()`):
`{"dataset", "splits": {"train"|"query"|"gallery": {"ids", "tracklets", "frames", "cameras"}},
"queries_without_match"}`. `--verify` checks that every frame decodes with the input pipeline's
own reader (`data_pipelines.frame_check`, the check every run does before it starts: TensorFlow,
in parallel; slow on MARS the first time) and lists the bad frames with their tracklets; frames
that decoded are remembered as the run's check remembers them (`--frame-check-cache`, "none"
decodes every frame). `--make-splits SEED` (PRID2011 only) first writes `splits_prid2011.json`
(see data_pipelines/readers/prid2011.py); `--splits-mat` converts the authors'
`train_test_splits_prid.mat` instead. Errors go to stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import ml_collections

from data_pipelines import frame_check
from data_pipelines import readers
from data_pipelines.readers import prid2011
from data_pipelines.synthetic import spec
from data_pipelines.tracklets import Split

PARTS = ("train", "query", "gallery")
COLUMNS = ("ids", "tracklets", "frames", "cameras")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m data_pipelines.inspect", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True, choices=readers.available())
  p.add_argument("--root", required=True, help="the dataset folder (native layout)")
  p.add_argument("--protocol", default="official", choices=("official", "torchreid"),
                 help="MARS / DukeV gallery protocol")
  p.add_argument("--split-id", type=int, default=0, help="iLIDS-VID / PRID2011 split (0..9)")
  p.add_argument("--no-distractors", dest="distractors", action="store_false",
                 help="drop pid 0 distractors (MARS, DukeV)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--verify", action="store_true",
                 help="check that every frame decodes, as the input pipeline reads it")
  p.add_argument("--frame-check-cache", default="", metavar="DIR",
                 help="--verify: folder of remembered good frames ('' the default "
                 "~/.cache/stmn_jax/frame_check, 'none' decodes every frame)")
  p.add_argument("--check-files", default="size", choices=("size", "exists", "none"),
                 help="frame check: exists and not empty (size), exists, or none")
  p.add_argument("--make-splits", type=int, default=None, metavar="SEED",
                 help="PRID2011: write splits_prid2011.json (10 random splits) first")
  p.add_argument("--splits-mat", default=None, metavar="PATH",
                 help="PRID2011: write splits_prid2011.json from train_test_splits_prid.mat")
  p.add_argument("--min-frames", type=int, default=prid2011.DEFAULT_MIN_FRAMES,
                 help="PRID2011 split making: minimum frames per camera")
  return p.parse_args(argv)


def _dataset_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """A `config.dataset` for --dataset=synthetic: the generator's default knobs (`spec`, the
  source `configs/synthetic.py` reads them from too)."""
  return ml_collections.ConfigDict({
      "name": readers.SYNTHETIC, "root": args.root, "protocol": args.protocol,
      "distractors": args.distractors, "synthetic": spec.defaults()})


def read(args: argparse.Namespace) -> Split:
  """The split as the reader lists it (frames are decoded by `verify`, not by the reader)."""
  options = dict(protocol=args.protocol, split_id=args.split_id, distractors=args.distractors,
                 check_files=args.check_files)
  if args.dataset == readers.SYNTHETIC:
    return readers.read_from_config(_dataset_config(args), check_files=args.check_files)
  return readers.read_dataset(args.dataset, args.root,
                              **readers.reader_kwargs(args.dataset, options))


def verify(split: Split, cache_dir: str = "") -> frame_check.CheckResult:
  """Every frame of `split` decodes (`frame_check`); else a DatasetError listing the bad ones."""
  parts = [(part, getattr(split, part)) for part in PARTS]
  result = frame_check.check_tracklets(parts, cache_dir=cache_dir)
  print(f"verified {result.num_frames:,} frames: {result.num_decoded:,} decoded, "
        f"{result.num_frames - result.num_decoded:,} unchanged since they last decoded "
        f"({result.seconds:.1f} s)", file=sys.stderr)
  return result


def table(summary: dict) -> str:
  """The summary as a fixed-width text table."""
  lines = [f"dataset: {summary['dataset']}",
           f"{'part':<8}" + "".join(f"{c:>11}" for c in COLUMNS)]
  for part in PARTS:
    counts = summary["splits"][part]
    lines.append(f"{part:<8}" + "".join(f"{counts[c]:>11,}" for c in COLUMNS))
  lines.append(f"queries without a valid gallery match: {summary['queries_without_match']}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    if args.make_splits is not None or args.splits_mat is not None:
      if args.dataset != "prid2011":
        raise readers.DatasetError("--make-splits / --splits-mat apply to --dataset=prid2011 only")
      if args.splits_mat is not None:
        path = prid2011.splits_from_mat(args.root, args.splits_mat, args.min_frames)
      else:
        path = prid2011.make_splits(args.root, args.make_splits, min_frames=args.min_frames)
      print(f"wrote {path}", file=sys.stderr)
    split = read(args)
    if args.verify:
      verify(split, args.frame_check_cache)
    summary = split.summary()
  except readers.DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary) if args.json else table(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
