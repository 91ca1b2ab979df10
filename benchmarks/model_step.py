"""Model speed: forward / train-step throughput of STMN, baseline, DRSA, STA vs the GEMM rate.

  python -m benchmarks.model_step [--paper-batch] [--models=stmn,baseline,drsa,sta] [--repeats=2]
      [--smoke] [--gemm-size=4096]

For each model (`--models` picks a subset to keep a run short) at the same settings: 256x128
(config.data), batch 4 tracklets x 6 frames by default (`--paper-batch`: the paper's 8 ids x 4
tracklets x 6 frames, slow on a CPU), each model's own loss (`losses.total_loss` of its config;
DRSA and STA keep their own backbone stride):
- forward (eval-mode BN, jitted) frames/s;
- train step (total_loss + grads + Adam with coupled weight decay, model and optimizer state
  donated) seconds per step; compile times are reported apart;
- FLOPs per frame from XLA's `cost_analysis()` of the compiled programs;
- the machine's fp32 GEMM rate (jitted 4096^3 matmul; `--gemm-size` for a quick check),
  measured again right before each timed figure, and each achieved rate as a fraction of the
  GEMM rate measured next to it.
The last line printed is one JSON object with every figure: `<model>_<figure>` keys, plus
`gemm_gflops`, `stmn_forward_fraction` and `stmn_train_fraction` (null when STMN is not run).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import common, mars
from stmn_jax import losses, models


DEFAULT_MODELS = ("stmn", "baseline", "drsa", "sta")


def _flops(compiled) -> float:
  """FLOPs of a compiled XLA program (cost_analysis is a dict, or a list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def gemm_gflops(n: int = 4096, repeats: int = 3) -> float:
  """fp32 GEMM rate of `jax.jit(a @ b)` for n x n matrices, in GFLOP/s."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  return 2 * n ** 3 / _median_time(lambda: mm(a, b), repeats) / 1e9


def optimizer_for(config) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (torch.optim.Adam(weight_decay=...)), config.optim."""
  o = config.optim
  return optax.chain(optax.add_decayed_weights(o.weight_decay),
                     optax.adam(o.learning_rate, b1=o.b1, b2=o.b2))


def bench_model(config, num_classes: int, batch: int, repeats: int,
                gemm_size: int = 4096) -> dict[str, Any]:
  """Forward and train-step figures for one config, each with the GEMM rate measured just
  before it (the machine is shared: the load changes within minutes)."""
  length, h, w = config.data.seq_len, config.data.height, config.data.width
  frames_n = batch * length
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.normal(size=(batch, length, h, w, 3)), jnp.float32)
  pid = jnp.asarray(np.arange(batch) // 2 % num_classes, jnp.int32)  # pairs of tracklets

  model = models.create_model(config, num_classes, nnx.Rngs(0), load_weights=False)

  # ------------------------------------------------------------------ forward (eval mode)
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, frames):
    return nnx.merge(graphdef, state)(frames)["embedding"]

  t = time.perf_counter()
  fwd = forward.lower(state, frames).compile()
  fwd_compile = time.perf_counter() - t
  fwd_flops = _flops(fwd)
  jax.block_until_ready(fwd(state, frames))
  fwd_gemm = gemm_gflops(gemm_size)
  fwd_time = _median_time(lambda: fwd(state, frames), repeats)

  # ------------------------------------------------------------------ train step
  model = nnx.merge(graphdef, state)
  model.train()
  opt = nnx.Optimizer(model, optimizer_for(config), wrt=nnx.Param)
  graphdef, train_state = nnx.split((model, opt))
  del model, opt, state

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(train_state, frames, pid, key):
    model, opt = nnx.merge(graphdef, train_state)

    def loss_fn(m):  # `key`: STA's inter-frame regulariser draws its frame pair
      return losses.total_loss(m(frames), {"pid": pid}, config, rng=key)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  t = time.perf_counter()
  key = jax.random.PRNGKey(0)
  step = train_step.lower(train_state, frames, pid, key).compile()
  step_compile = time.perf_counter() - t
  step_flops = _flops(step)
  train_state, loss = step(train_state, frames, pid, key)  # warm-up
  jax.block_until_ready(loss)
  step_gemm = gemm_gflops(gemm_size)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    train_state, loss = step(train_state, frames, pid, key)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  step_time = float(np.median(times))
  if not np.isfinite(float(loss)):
    raise RuntimeError(f"non-finite training loss {float(loss)} in the benchmark")
  return dict(
      batch=f"{batch}x{length}", frames_per_batch=frames_n,
      forward_compile_s=fwd_compile, forward_s=fwd_time, forward_frames_per_s=frames_n / fwd_time,
      forward_gflop_per_frame=fwd_flops / frames_n / 1e9,
      forward_gflops=fwd_flops / fwd_time / 1e9,
      forward_gemm_gflops=fwd_gemm, forward_fraction=fwd_flops / fwd_time / 1e9 / fwd_gemm,
      train_compile_s=step_compile, train_step_s=step_time,
      train_frames_per_s=frames_n / step_time,
      train_gflop_per_frame=step_flops / frames_n / 1e9,
      train_gflops=step_flops / step_time / 1e9,
      train_gemm_gflops=step_gemm, train_fraction=step_flops / step_time / 1e9 / step_gemm,
  )


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--paper-batch", action="store_true",
                      help="the paper's 8 ids x 4 tracklets x 6 frames (192 frames; slow on CPU)")
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                      help="comma-separated presets of configs/common.py MODEL_PRESETS "
                           f"(default {','.join(DEFAULT_MODELS)})")
  parser.add_argument("--repeats", type=int, default=2, help="timed repeats (median)")
  parser.add_argument("--num-classes", type=int, default=625)
  parser.add_argument("--smoke", action="store_true", help="tiny model and images (a check)")
  parser.add_argument("--gemm-size", type=int, default=4096,
                      help="n of the n^3 GEMM reference (smaller: a quicker, rougher check)")
  args = parser.parse_args(argv)
  presets = [p.strip() for p in args.models.split(",") if p.strip()]
  unknown = [p for p in presets if p not in common.MODEL_PRESETS]
  if unknown or not presets:
    parser.error(f"--models: unknown or no presets {unknown}; expected a comma-separated subset "
                 f"of {', '.join(common.MODEL_PRESETS)}")
  if args.gemm_size < 1 or args.repeats < 1:
    parser.error("--gemm-size and --repeats must be >= 1")

  gemm = gemm_gflops(args.gemm_size)
  print(f"fp32 GEMM {args.gemm_size}^3 (jax.jit): {gemm:.1f} GFLOP/s", flush=True)
  result: dict[str, Any] = {"gemm_gflops": gemm, "devices": str(jax.devices()[0].platform),
                            "device_count": jax.device_count()}
  for preset in presets:
    config = mars.get_config(preset + (",smoke" if args.smoke else ""))
    if not args.smoke:
      config.data.seq_len = 6
    batch = (config.data.num_ids_per_batch * config.data.num_tracklets_per_id
             if args.paper_batch else 4)
    r = bench_model(config, args.num_classes, batch, args.repeats, args.gemm_size)
    gemm = max(gemm, r["forward_gemm_gflops"], r["train_gemm_gflops"])
    print(f"{preset:>10} {r['batch']} at {config.data.height}x{config.data.width}: "
          f"forward {r['forward_frames_per_s']:.2f} frames/s "
          f"({r['forward_gflop_per_frame']:.2f} GFLOP/frame, {r['forward_gflops']:.1f} GFLOP/s, "
          f"{r['forward_fraction']:.0%} of GEMM {r['forward_gemm_gflops']:.0f}; "
          f"compile {r['forward_compile_s']:.1f} s) | "
          f"train step {r['train_step_s']:.2f} s = {r['train_frames_per_s']:.2f} frames/s "
          f"({r['train_gflop_per_frame']:.2f} GFLOP/frame, {r['train_gflops']:.1f} GFLOP/s, "
          f"{r['train_fraction']:.0%} of GEMM {r['train_gemm_gflops']:.0f}; "
          f"compile {r['train_compile_s']:.1f} s)", flush=True)
    for k, v in r.items():
      result[f"{preset}_{k}"] = v
  result["gemm_gflops"] = gemm  # the best rate seen; each fraction uses its own neighbour
  for key in ("stmn_forward_fraction", "stmn_train_fraction"):
    result.setdefault(key, None)  # stable keys when STMN is not in --models
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
