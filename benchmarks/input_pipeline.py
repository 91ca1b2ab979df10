"""Throughput of the training input pipeline (frames/s, and per CPU core used).

    python -m benchmarks.input_pipeline [--threads=1,2] [--batches=8] [--data=synthetic|random]

Frames are JPEGs at 256x128 (the paper's input size): the synthetic benchmark
(`data_pipelines.synthetic.generate`, small knobs) or, with `--data=random` or when the generator
is not available, a few hundred smooth random JPEGs written to a temp dir. For each thread count
the pipeline runs with `tf.data.Options().threading.private_threadpool_size` set to it, the
paper's batch (P=8 x K=4 tracklets x L=6 frames = 192 frames) and the full training transform
(decode, flip, erasing, normalise). Reported: frames/s, the CPU time the process used per wall
second (the cores actually busy), and frames/s per thread and per busy core. The last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from configs import default  # noqa: E402
from data_pipelines import pipeline, readers, synthetic  # noqa: E402
from data_pipelines.tracklets import Tracklet  # noqa: E402


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def random_frames(out_dir: str, num_ids: int, tracklets_per_id: int, frames_per_tracklet: int,
                  height: int, width: int, seed: int = 0):
  """Writes smooth random JPEGs (realistic compressed sizes); returns the Tracklets."""
  rng = np.random.default_rng(seed)
  out = []
  for pid in range(num_ids):
    for k in range(tracklets_per_id):
      paths = []
      for j in range(frames_per_tracklet):
        low = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((width, height), Image.BILINEAR)
        noise = rng.integers(-12, 13, (height, width, 3))
        arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
        p = os.path.join(out_dir, f"{pid:04d}C{k % 6 + 1}T{k:04d}F{j:03d}.jpg")
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
      out.append(Tracklet(tuple(paths), pid, k % 6))
  return out


def synthetic_frames(out_dir: str, height: int, width: int):
  """The synthetic benchmark at (height, width), small knobs; returns its train Tracklets."""
  root = os.path.join(out_dir, "synthetic")
  synthetic.generate(root, num_train_ids=16, num_test_ids=2, height=height, width=width,
                     short_max_length=24, max_length=40, num_distractor_tracklets=0,
                     num_junk_tracklets=0)
  return list(readers.read_dataset("mars", root).train)


def measure(tracklets, config, threads: int, batches: int, warmup: int) -> dict:
  config = config.copy_and_resolve_references()
  config.data.num_parallel_calls = threads
  it = pipeline.train_iterator(tracklets, config, process_index=0, process_count=1,
                               num_threads=threads)
  for _ in range(warmup):
    next(it)
  frames_per_batch = None
  t0, c0 = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    b = next(it)
    frames_per_batch = b["frames"].shape[0] * b["frames"].shape[1]
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  fps = batches * frames_per_batch / wall
  busy = cpu / wall
  return {
      "threads": threads,
      "frames_per_s": round(fps, 1),
      "busy_cores": round(busy, 2),
      "frames_per_s_per_thread": round(fps / threads, 1),
      "frames_per_s_per_busy_core": round(fps / max(busy, 1e-9), 1),
      "batches": batches,
      "frames_per_batch": frames_per_batch,
      "wall_s": round(wall, 2),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", default="1,2", help="comma-separated tf.data pool sizes")
  parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--data", choices=("synthetic", "random"), default="synthetic")
  parser.add_argument("--height", type=int, default=256)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--dir", default="", help="where to write frames (default: a temp dir)")
  args = parser.parse_args(argv)

  config = default.get_config()
  config.data.height, config.data.width = args.height, args.width
  out_dir = args.dir or tempfile.mkdtemp(prefix="input_bench_")
  t0 = time.perf_counter()
  data = args.data
  tracklets = None
  if data == "synthetic":
    try:
      tracklets = synthetic_frames(out_dir, args.height, args.width)
    except (ImportError, AttributeError) as e:  # generator not available in this checkout
      print(f"synthetic generator unavailable ({e}); using random JPEGs", file=sys.stderr)
      data = "random"
  if tracklets is None:
    tracklets = random_frames(out_dir, num_ids=16, tracklets_per_id=2, frames_per_tracklet=12,
                              height=args.height, width=args.width)
  num_frames = sum(t.num_frames for t in tracklets)
  print(f"data: {data}, {len(tracklets)} tracklets, {num_frames} frames at "
        f"{args.height}x{args.width}, written in {time.perf_counter() - t0:.1f} s")
  print(f"batch: P={config.data.num_ids_per_batch} x K={config.data.num_tracklets_per_id} x "
        f"L={config.data.seq_len}; machine: {os.cpu_count()} CPUs")
  results = []
  for threads in [int(t) for t in args.threads.split(",") if t]:
    r = measure(tracklets, config, threads, args.batches, args.warmup)
    results.append(r)
    print(f"threads={threads}: {r['frames_per_s']:.0f} frames/s, {r['busy_cores']:.2f} busy "
          f"cores, {r['frames_per_s_per_thread']:.0f} frames/s per thread, "
          f"{r['frames_per_s_per_busy_core']:.0f} per busy core")
  summary = {"benchmark": "input_pipeline", "data": data, "height": args.height,
             "width": args.width, "num_frames_on_disk": num_frames, "results": results}
  if not args.dir:
    shutil.rmtree(out_dir, ignore_errors=True)
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
