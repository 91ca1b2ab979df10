"""Ablation v2 (issue 17): measured costs, for choosing the size and for the plan's estimate.

  python -m benchmarks.ablation_v2_cost --candidates   # train-step cost of candidate sizes
  python -m benchmarks.ablation --protocol=v2 --measure  # the chosen size: cost.json + plan

`step_seconds` times the train step the way `benchmarks/model_step.py` does (the engine's
`create_train_state` / `make_train_step` on random data, its `_median_time`, compile apart).
`measure` adds, at the chosen protocol size: generating one benchmark, one test evaluation
(all-frames clips, flip), one memory-statistics pass, and a pilot (pretraining and one `stmn`
run of a few steps through the real runner, in `<workdir>/pilot`) whose time beyond its steps,
evaluation and statistics is the per-run overhead (set-up, tracing, compile-cache hits,
checkpoint saves and restores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Sequence

from benchmarks import ablation_v2 as v2

# (height, width, last stride, ResNet-18 width): v1's size first.
CANDIDATES = ((64, 32, 1, 0.125), (64, 32, 1, 0.25), (96, 48, 1, 0.25), (128, 64, 1, 0.125),
              (128, 64, 1, 0.25), (128, 64, 2, 0.25))


def step_seconds(config, repeats: int = 5) -> dict[str, float]:
  """{"step_s", "compile_s", "map"} of the train step of `config` on random data."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import model_step  # pylint: disable=g-import-not-at-top
  from stmn_jax import sharding  # pylint: disable=g-import-not-at-top
  from stmn_jax import train_state as train_lib  # pylint: disable=g-import-not-at-top

  d = config.data
  mesh = sharding.make_mesh()
  batch = d.num_ids_per_batch * d.num_tracklets_per_id
  classes = config.dataset.synthetic.num_train_ids
  state, lr_fn = train_lib.create_train_state(config, classes, 100, mesh)
  step_fn = train_lib.make_train_step(state, config, mesh, lr_fn)
  rng = np.random.default_rng(0)
  fake = sharding.global_batch({
      "frames": rng.normal(size=(batch, d.seq_len, d.height, d.width, 3)).astype(np.float32),
      "pid": (np.arange(batch) // d.num_tracklets_per_id % classes).astype(np.int32),
      "camid": np.zeros(batch, np.int32)}, mesh)
  t = time.perf_counter()
  step_fn.lower(state.model_state, state.opt_state, fake, state.rng, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t
  for _ in range(2):
    jax.block_until_ready(train_lib.train_step(state, step_fn, fake)["loss"])
  s = model_step._median_time(  # pylint: disable=protected-access
      lambda: train_lib.train_step(state, step_fn, fake)["loss"], repeats)
  model = state.model()
  h, w = d.height // 16, d.width // 16
  if config.model.last_stride == 2:
    h, w = max(1, h // 2), max(1, w // 2)
  return {"step_s": s, "compile_s": compile_s, "map": f"{h}x{w}",
          "has_trunk": hasattr(model, "trunk")}


def candidates(variant: str = "stmn", repeats: int = 5) -> list[dict[str, Any]]:
  """Train-step cost of `variant` at each of `CANDIDATES` (the protocol's batch)."""
  out = []
  for h, w, stride, width in CANDIDATES:
    p = dataclasses.replace(v2.PROTOCOLS["full"], height=h, width=w, last_stride=stride,
                            net_width=width)
    config = v2.run_config(p, v2.Run("all", variant, 0), "/tmp/unused", "")
    r = step_seconds(config, repeats)
    r.update(height=h, width=w, last_stride=stride, net_width=width, variant=variant)
    print(json.dumps(r), flush=True)
    out.append(r)
  return out


def measure(p: v2.Protocol, root: str, variants: Sequence[str],
            pilot_steps: int = 4) -> dict[str, Any]:
  """The cost dict of `v2.estimate` at protocol `p` (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  from stmn_jax import evaluators, run_setup, visualize  # pylint: disable=g-import-not-at-top
  from stmn_jax import train_state as train_lib  # pylint: disable=g-import-not-at-top
  from benchmarks import ablation_v2_memory as mem  # pylint: disable=g-import-not-at-top

  cost: dict[str, Any] = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "load1_before": os.getloadavg()[0], "step_s": {}, "compile_s": {}}
  pilot = v2.wpath(root, "pilot")
  t = time.time()
  synthetic.ensure_generated(v2.data_root(pilot, "all"), v2.family_knobs(p, "all"))
  cost["data_s"] = time.time() - t
  for v in dict.fromkeys(["baseline", *variants]):
    r = step_seconds(v2.run_config(p, v2.Run("all", v, 0), pilot, ""))
    cost["step_s"][v], cost["compile_s"][v] = r["step_s"], r["compile_s"]
    print(f"[cost] {v}: {r['step_s']:.3f} s/step, compile {r['compile_s']:.0f} s", flush=True)
  cost["pretrain_step_s"] = cost["step_s"]["baseline"]  # the same model, the same batch
  config = v2.run_config(p, v2.Run("all", "stmn", 0), pilot, "")
  setup = run_setup.prepare_run(config)
  state, _ = train_lib.create_train_state(config, setup.num_classes, 1, setup.mesh)
  evaluator = evaluators.from_config(state, config, setup.mesh)
  t = time.time()
  evaluator.run(state, setup.test_split.query, setup.test_split.gallery)  # with compiles
  cost["eval_first_s"] = time.time() - t
  t = time.time()
  evaluator.run(state, setup.test_split.query, setup.test_split.gallery)
  cost["eval_s"] = time.time() - t
  tracklets = list(setup.test_split.gallery)
  meta = visualize.synthetic_meta(config, tracklets)
  ids = mem.pick_tracklets(tracklets, meta, p.stats_tracklets, p.seq_len)
  forward = mem.make_stats_forward(state, setup.mesh)
  mem.memory_stats_at(state, config, setup.mesh, forward, tracklets, meta, ids[:2])  # compile
  t = time.time()
  mem.memory_stats_at(state, config, setup.mesh, forward, tracklets, meta, ids)
  cost["stats_s"] = time.time() - t
  cost["queries"], cost["gallery"] = len(setup.test_split.query), len(setup.test_split.gallery)
  # Pilot through the real runner: pretraining and one run of a few steps.
  pp = dataclasses.replace(p, pretrain_steps=pilot_steps, steps=pilot_steps,
                           stats_every=pilot_steps // 2)
  t = time.time()
  path = v2.pretrain(pp, pilot)
  cost["pilot_pretrain_s"] = time.time() - t
  t = time.time()
  v2.run_one(pp, v2.Run("all", "stmn", 0), pilot, path)
  cost["pilot_run_s"] = time.time() - t
  rest = (cost["pilot_run_s"] - pilot_steps * cost["step_s"]["stmn"] - cost["eval_s"]
          - len(pp.stats_steps) * cost["stats_s"])
  cost["overhead_s"] = max(0.0, rest)
  cost["pilot_steps"] = pilot_steps
  cost["load1_after"] = os.getloadavg()[0]
  cost["devices"] = jax.device_count()
  return cost


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--candidates", action="store_true")
  ap.add_argument("--variant", default="stmn")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default="", help="also write the candidates' JSON list here")
  a = ap.parse_args(argv)
  if a.candidates:
    out = candidates(a.variant, a.repeats)
    if a.out:
      v2.write_json(a.out, {"load1": os.getloadavg()[0], "candidates": out})
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
