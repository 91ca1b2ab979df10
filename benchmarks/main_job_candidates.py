"""Train-step and eval-forward time of main-job candidates, interleaved in one process.

  python -m benchmarks.main_job_candidates [--repeats=3] WIDTH,HEIGHT,WIDTH_PX,P,K ...

e.g. `0.25,64,32,8,4 0.5,64,32,8,4` (ResNet-18 width, input height and width, P ids x K
tracklets per batch; L = 4 and the rest from configs/synthetic.py:stmn). Each candidate is
built through the engine's own functions (`create_train_state`, `make_train_step`,
`make_embed_fn` with flip, as the evaluation runs it) and compiled first; then the candidates
are timed in turn, round after round (3 train steps, then one eval batch), so that a change in
the load of a shared machine falls on all of them alike. Prints each candidate's median train
step and eval batch in seconds and as a ratio to the first candidate (the reference), and the
first step's and the forward's compile-and-run seconds. Used to choose the main job's size
(issue 17, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import synthetic as synthetic_configs
from stmn_jax import embedding, sharding
from stmn_jax import train_state as train_lib


def candidate_config(spec: str):
  """configs/synthetic.py:stmn with `width,height,width_px,P,K` from `spec`."""
  try:
    width, height, width_px, ids, tracklets = spec.split(",")
    values = float(width), int(height), int(width_px), int(ids), int(tracklets)
  except ValueError as e:
    raise SystemExit(f"candidate {spec!r}: expected WIDTH,HEIGHT,WIDTH_PX,P,K, e.g. "
                     "0.25,64,32,8,4") from e
  config = synthetic_configs.get_config("stmn")
  config.model.pretrained = ""  # the shipped trunk fits width 0.25 only; timing needs no weights
  (config.model.width, config.data.height, config.data.width, config.data.num_ids_per_batch,
   config.data.num_tracklets_per_id) = values
  return config


def prepare(config, mesh, num_classes: int, rng: np.random.Generator) -> dict:
  """Compiled train step and eval forward of one candidate, on random data."""
  d = config.data
  batch = d.num_ids_per_batch * d.num_tracklets_per_id
  state, lr_fn = train_lib.create_train_state(config, num_classes, 100, mesh)
  step_fn = train_lib.make_train_step(state, config, mesh, lr_fn)
  fake = sharding.global_batch({
      "frames": rng.normal(size=(batch, d.seq_len, d.height, d.width, 3)).astype(np.float32),
      "pid": (np.arange(batch) // d.num_tracklets_per_id % num_classes).astype(np.int32),
      "camid": np.zeros(batch, np.int32)}, mesh)
  t = time.perf_counter()
  jax.block_until_ready(train_lib.train_step(state, step_fn, fake)["loss"])
  step_compile = time.perf_counter() - t
  embed = embedding.make_embed_fn(state, mesh, flip=True)
  frames = sharding.global_batch({"frames": rng.normal(
      size=(d.eval_batch_size, d.seq_len, d.height, d.width, 3)).astype(np.float32)},
                                 mesh)["frames"]
  t = time.perf_counter()
  jax.block_until_ready(embed(state.model_state, frames))
  return dict(state=state, step_fn=step_fn, fake=fake, embed=embed, frames=frames,
              step_compile=step_compile, forward_compile=time.perf_counter() - t,
              step_s=[], forward_s=[])


def time_round(c: dict, steps: int = 3) -> None:
  """One round: `steps` train steps (mean), then one eval batch."""
  t = time.perf_counter()
  for _ in range(steps):
    loss = train_lib.train_step(c["state"], c["step_fn"], c["fake"])["loss"]
  jax.block_until_ready(loss)
  c["step_s"].append((time.perf_counter() - t) / steps)
  t = time.perf_counter()
  jax.block_until_ready(c["embed"](c["state"].model_state, c["frames"]))
  c["forward_s"].append(time.perf_counter() - t)


def main(argv=None) -> dict[str, dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("candidates", nargs="+", help="WIDTH,HEIGHT,WIDTH_PX,P,K; first = reference")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
  parser.add_argument("--num-classes", type=int, default=52, help="the main job's 52 train ids")
  args = parser.parse_args(argv)
  configs = {spec: candidate_config(spec) for spec in args.candidates}  # all checked first
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  cands = {}
  for spec, config in configs.items():
    cands[spec] = prepare(config, mesh, args.num_classes, rng)
    print(f"{spec}: first step {cands[spec]['step_compile']:.1f} s, "
          f"eval forward {cands[spec]['forward_compile']:.1f} s (compile included)", flush=True)
  for _ in range(args.repeats):
    for c in cands.values():
      time_round(c)
  out, ref = {}, None
  for spec, c in cands.items():
    step, fwd = float(np.median(c["step_s"])), float(np.median(c["forward_s"]))
    ref = ref or (step, fwd)
    out[spec] = dict(step_s=step, step_ratio=step / ref[0], forward_s=fwd,
                     forward_ratio=fwd / ref[1])
    print(f"{spec}: train step {step:.3f} s ({step / ref[0]:.2f}x), eval batch with flip "
          f"{fwd:.3f} s ({fwd / ref[1]:.2f}x)")
  return out


if __name__ == "__main__":
  main()
