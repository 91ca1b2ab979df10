"""`python -m stmn_jax.ranking`: CMC / mAP / mINP of saved query and gallery features.

    python -m stmn_jax.ranking --features=F.npz [--distance=cosine --ap=noninterp --rerank ...]
    python -m stmn_jax.ranking --query=Q.npy --gallery=G.npy [--stream --gallery_chunk=N ...]

`--features`: one .npz with the arrays `NPZ_KEYS` (read by `load_features`, no pickle);
`--query` / `--gallery`: the `.npy` + `.csv` files of `main.py --mode=extract`
(`features_io.read_arrays`; the gallery memory-mapped). Large galleries are ranked with
`rank_streaming`. Prints a table, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from stmn_jax import features_io
from stmn_jax.ranking.distances import METRICS
from stmn_jax.ranking.exact import AP_MODES
from stmn_jax.ranking.metrics import add_table_ranks, evaluate, format_table, json_ready
from stmn_jax.ranking.streaming import rank_streaming

# The flags' defaults: the `eval` block of configs/default.py (the library does not import
# configs; tests/test_evaluation.py checks that the two agree).
CLI_DEFAULTS = {"distance": "cosine", "rerank": False, "ap": "noninterp", "max_rank": 20}
NPZ_KEYS = ("q_feats", "g_feats", "q_pids", "g_pids", "q_camids", "g_camids")
# `--query --gallery` streams galleries above this many rows.
STREAM_ABOVE = 100_000


def load_features(path: str) -> dict[str, np.ndarray]:
  """The six arrays of a features .npz (no pickle); a missing key names the key and the file."""
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in NPZ_KEYS if k not in data.files]
      if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)} (expected "
                         f"{', '.join(NPZ_KEYS)}; found {', '.join(data.files) or 'none'})")
      out = {k: data[k] for k in NPZ_KEYS}
  except (OSError, ValueError) as e:
    if isinstance(e, ValueError) and str(e).startswith(f"{path}:"):
      raise
    raise ValueError(f"{path}: cannot read as a .npz of arrays without pickle: {e}") from e
  for k in ("q_feats", "g_feats"):
    if out[k].ndim != 2:
      raise ValueError(f"{path}: {k} must be 2-D (N, D), got shape {out[k].shape}")
  for k, feats in (("q_pids", "q_feats"), ("q_camids", "q_feats"),
                   ("g_pids", "g_feats"), ("g_camids", "g_feats")):
    if out[k].shape != (out[feats].shape[0],):
      raise ValueError(f"{path}: {k} must have shape ({out[feats].shape[0]},) like {feats}, got "
                       f"{out[k].shape}")
  return out



def main(argv: Sequence[str] | None = None, prog: str = "python -m stmn_jax.ranking") -> int:
  """`--features=FILE.npz [...]` or `--query=Q.npy --gallery=G.npy` (features from
  `main.py --mode=extract`); defaults: `CLI_DEFAULTS`. Returns the exit status (2: bad input)."""
  defaults = CLI_DEFAULTS
  parser = argparse.ArgumentParser(
      prog=prog,
      description="CMC / mAP / mINP of saved query and gallery features "
                  f"(npz keys: {' '.join(NPZ_KEYS)}).",
  )
  parser.add_argument("--features", help="the .npz file")
  parser.add_argument("--query", help="query features .npy from --mode=extract (with its .csv)")
  parser.add_argument("--gallery", help="gallery features .npy from --mode=extract (with its .csv)")
  parser.add_argument("--distance", default=defaults["distance"], choices=METRICS)
  parser.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=defaults["rerank"])
  parser.add_argument("--ap", default=defaults["ap"], choices=AP_MODES)
  parser.add_argument("--max_rank", type=int, default=defaults["max_rank"])
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                      help="rank with rank_streaming (gallery in chunks, memory-mapped .npy); "
                           "default: when the gallery has more than --stream_above items")
  parser.add_argument("--stream_above", type=int, default=STREAM_ABOVE,
                      help="gallery size above which the ranking streams (without --rerank)")
  parser.add_argument("--gallery_chunk", type=int, default=None,
                      help="gallery rows per streamed chunk (default: rank_streaming's)")
  args = parser.parse_args(argv)
  if bool(args.features) == bool(args.query and args.gallery) or (
      bool(args.query) != bool(args.gallery)):
    parser.error("give either --features=F.npz or both --query=Q.npy and --gallery=G.npy")
  if args.stream and args.rerank:
    print("error: --stream cannot be combined with --rerank (re-ranking needs the (G, G) "
          "gallery distances in memory)", file=sys.stderr)
    return 2
  try:
    if args.features:
      data = load_features(args.features)
    else:
      data = {}
      for side, path in (("q", args.query), ("g", args.gallery)):
        data[f"{side}_feats"], data[f"{side}_pids"], data[f"{side}_camids"] = (
            features_io.read_arrays(path, mmap=side == "g"))
    stream = args.stream
    if stream is None:
      stream = not args.rerank and data["g_feats"].shape[0] > args.stream_above
    if stream:
      results = rank_streaming(
          data["q_feats"], data["q_pids"], data["q_camids"],
          (data["g_feats"], data["g_pids"], data["g_camids"]), metric=args.distance,
          max_rank=args.max_rank, ap=args.ap, gallery_chunk=args.gallery_chunk)
      add_table_ranks(results, args.max_rank)
      results["streamed"] = True
    else:
      results = evaluate(
          data["q_feats"], data["g_feats"], data["q_pids"], data["g_pids"],
          data["q_camids"], data["g_camids"], distance=args.distance, rerank=args.rerank,
          ap=args.ap, max_rank=args.max_rank,
      )
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if args.json:
    out = json_ready(results)
    out.update(distance=args.distance, rerank=args.rerank, ap=args.ap,
               features=args.features or [args.query, args.gallery])
    print(json.dumps(out))
  else:
    print(format_table(results))
  return 0
