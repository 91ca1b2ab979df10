"""`--mode=extract`: tracklet embeddings of a split, or of a folder of tracklet folders, to disk.

`--split=query|gallery|train` (of the test split; default query) or `--input_dir=DIR` (one
sub-folder of frames per tracklet, `data_pipelines.folders`) -> `W/features/<name>.npy`
(T, D) float32 plus `W/features/<name>.csv` (tracklet, pid, camera, num_frames, first_frame),
the format of `features_io`. Embeddings follow `config.eval.sampling` (every sampling, "whole"
included) through `inference.embed_tracklets`. The workdir may be local or `gs://...`
(`workdir_io`).
"""

from __future__ import annotations

import os

import jax
import ml_collections

from data_pipelines import folders
from stmn_jax import errors
from stmn_jax import features_io
from stmn_jax import inference
from stmn_jax import run_setup
from stmn_jax import workdir_io

PARTS = ("query", "gallery", "train")


def features_dir(workdir: str) -> str:
  return str(workdir_io.workdir_path(workdir) / "features")


def extract_mode(
    config: ml_collections.ConfigDict, workdir: str, split: str | None = None,
    input_dir: str | None = None,
) -> dict:
  """Embeddings of `split` or of the tracklet folders of `input_dir` (module docstring)."""
  if split and input_dir:
    raise errors.ConfigError("--split and --input_dir exclude each other")
  split = split or "query"
  if not input_dir and split not in PARTS:
    raise errors.ConfigError(f"--split={split!r}: expected query, gallery or train")
  if input_dir:
    names, tracklets = folders.read_folder(input_dir)
    label = os.path.basename(os.path.normpath(input_dir))
    config = run_setup.with_files_source(config)
    run = inference.prepare(config, workdir, read_data=False)
  else:
    run = inference.prepare(config, workdir)
    tracklets = list(run.setup.test_split.part(split))
    names = [f"{split}/{i}" for i in range(len(tracklets))]
    label = split
  feats = inference.embed_tracklets(run.state, tracklets, config, run.mesh, progress=True)
  npy = str(workdir_io.workdir_path(workdir) / "features" / f"{label}.npy")
  if jax.process_index() == 0:  # every host holds the same pooled features
    npy, index = features_io.write_features(npy, feats, names, tracklets)
  else:
    index = features_io.index_path(npy)
  print(f"\nExtracted {feats.shape[0]} embeddings ({feats.shape[1]}-d, {run.checkpoint}):\n"
        f"  {npy}\n  {index}", flush=True)
  return {"mode": "extract", "checkpoint": run.checkpoint, "embeddings": npy, "index": index,
          "num_tracklets": int(feats.shape[0])}
