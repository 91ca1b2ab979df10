"""Model speed: forward / train-step throughput of STMN, baseline, DRSA, STA vs the GEMM rate.

  python -m benchmarks.model_step [--paper-batch] [--models=stmn,baseline,drsa,sta] [--repeats=2]
      [--smoke] [--gemm-size=4096] [--kernels=auto|fast|stock] [--compare-kernels]
      [--with-data [--data-root=DIR] [--data-steps=20]] [--no-synthetic]

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
`--kernels` picks the ResNet kernels (`stmn_jax.models.resnet.kernels`: "auto" = the CPU
rewrites on XLA:CPU); `--compare-kernels` also times each model's train step with the stock
Flax kernels, alternating stock / rewritten steps in one process (`<model>_stock_train_step_s`,
`<model>_kernel_speedup`: wall-time ratio of the medians; CPU-time ratio beside it).

Then the synthetic default's main job (configs/synthetic.py: STMN, ResNet-18 w0.25, 64x32,
L=4, batch 8x4), through the engine's own functions (`create_train_state`, `make_train_step`,
`make_embed_fn`): forward frames/s at the eval batch and train-step s/step on random data
(`synthetic_*` keys). `--with-data` adds the real input pipeline of that benchmark
(generated into `--data-root` if missing): `--data-steps` train steps fed by
`pipeline.train_iterator` + `sharding.prefetch_to_mesh` as in train.py, each step waited for,
reporting the fraction of the time spent waiting for the next batch
(`synthetic_data_wait_fraction`); and the evaluation's batched feature extraction
(`pipeline.eval_iterator` all-frames clips -> `pooling.extract_features` with
`make_embed_fn`, flip included) over the test split's tracklets, as model frames/s next to the
plain forward rate (`synthetic_extract_vs_forward`).

The last line printed is one JSON object with every figure: `<model>_<figure>` keys, plus
`gemm_gflops`, `stmn_forward_fraction` and `stmn_train_fraction` (null when STMN is not run),
and the `synthetic_*` keys.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import common, mars
from configs import synthetic as synthetic_configs
from stmn_jax import embedding, losses, models, pooling, run_setup, sharding
from stmn_jax import train_state as train_lib
from stmn_jax.models import resnet


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
                gemm_size: int = 4096, compare_kernels: bool = False) -> dict[str, Any]:
  """Forward and train-step figures for one config, each with the GEMM rate measured just
  before it (the machine is shared: the load changes within minutes). `compare_kernels`:
  also the train step traced with `resnet.kernels("stock")`, timed alternately with the
  current one."""
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

  def train_step(train_state, frames, pid, key):
    model, opt = nnx.merge(graphdef, train_state)

    def loss_fn(m):  # `key`: STA's inter-frame regulariser draws its frame pair
      return losses.total_loss(m(frames), {"pid": pid}, config, rng=key)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  t = time.perf_counter()
  key = jax.random.PRNGKey(0)
  step = jax.jit(train_step, donate_argnums=0).lower(train_state, frames, pid, key).compile()
  step_compile = time.perf_counter() - t
  step_flops = _flops(step)
  variants = {"current": [step, train_state]}
  if compare_kernels:  # a second state: donation consumes each variant's own buffers
    stock_state = jax.tree.map(jnp.copy, train_state)
    with resnet.kernels("stock"):
      stock = jax.jit(train_step, donate_argnums=0).lower(stock_state, frames, pid, key).compile()
    variants["stock"] = [stock, stock_state]
  for v in variants.values():  # warm-up
    v[1], loss = v[0](v[1], frames, pid, key)
    jax.block_until_ready(loss)
  step_gemm = gemm_gflops(gemm_size)
  times = {name: ([], []) for name in variants}  # wall, process CPU time
  for _ in range(repeats):
    for name, v in variants.items():  # alternate: both see the same load
      t, c = time.perf_counter(), time.process_time()
      v[1], loss = v[0](v[1], frames, pid, key)
      jax.block_until_ready(loss)
      times[name][0].append(time.perf_counter() - t)
      times[name][1].append(time.process_time() - c)
      if not np.isfinite(float(loss)):
        raise RuntimeError(f"non-finite training loss {float(loss)} in the benchmark ({name})")
  step_time = float(np.median(times["current"][0]))
  extra = {}
  if compare_kernels:
    stock_time = float(np.median(times["stock"][0]))
    extra = dict(stock_train_step_s=stock_time, kernel_speedup=stock_time / step_time,
                 kernel_speedup_cpu_time=float(np.median(times["stock"][1])
                                               / np.median(times["current"][1])))
  return dict(**extra,
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


def _global(batch: dict, mesh) -> dict:
  return sharding.global_batch(batch, mesh)


def bench_synthetic(repeats: int, gemm_size: int = 4096, with_data: bool = False,
                    data_root: str = "", data_steps: int = 20, smoke: bool = False
                    ) -> dict[str, Any]:
  """The synthetic default's main job (configs/synthetic.py) through the engine's functions:
  forward at the eval batch, train step; with data: input-pipeline wait and extraction."""
  config = synthetic_configs.get_config("stmn,smoke" if smoke else "stmn")
  if data_root:
    config.dataset.root = data_root
  d = config.data
  mesh = sharding.make_mesh()
  batch, length, h, w = d.num_ids_per_batch * d.num_tracklets_per_id, d.seq_len, d.height, d.width
  # Training ids without data: the generator's train ids minus the held-out validation ids.
  num_classes = config.dataset.synthetic.num_train_ids - config.dataset.num_val_ids
  if with_data:
    t = time.perf_counter()
    train_split, _, split, _ = run_setup.load_data(config)
    num_classes = len({t.pid for t in train_split.train})
    data_s = time.perf_counter() - t
  state, lr_fn = train_lib.create_train_state(config, num_classes, 100, mesh)
  step_fn = train_lib.make_train_step(state, config, mesh, lr_fn)
  rng = np.random.default_rng(0)
  fake = _global({
      "frames": rng.normal(size=(batch, length, h, w, 3)).astype(np.float32),
      "pid": (np.arange(batch) // d.num_tracklets_per_id % num_classes).astype(np.int32),
      "camid": np.zeros(batch, np.int32)}, mesh)
  out: dict[str, Any] = dict(config="configs/synthetic.py:stmn" + (",smoke" if smoke else ""),
                             batch=f"{batch}x{length}", height=h, width=w,
                             num_classes=num_classes)

  # ------------------------------------------------------------------ forward (eval batch)
  ev = d.eval_batch_size
  embed = embedding.make_embed_fn(state, mesh, flip=False)
  frames = _global({"frames": rng.normal(size=(ev, length, h, w, 3)).astype(np.float32)},
                   mesh)["frames"]
  t = time.perf_counter()
  fwd = embed.lower(state.model_state, frames).compile()
  out["forward_compile_s"] = time.perf_counter() - t
  fwd_flops = _flops(fwd)
  jax.block_until_ready(fwd(state.model_state, frames))
  out["forward_gemm_gflops"] = gemm_gflops(gemm_size)
  fwd_time = _median_time(lambda: fwd(state.model_state, frames), max(repeats, 3))
  out.update(forward_batch=f"{ev}x{length}", forward_frames_per_s=ev * length / fwd_time,
             forward_gflop_per_frame=fwd_flops / (ev * length) / 1e9,
             forward_fraction=fwd_flops / fwd_time / 1e9 / out["forward_gemm_gflops"])

  # ------------------------------------------------------------------ train step, random data
  step_args = (state.model_state, state.opt_state, fake, state.rng, jnp.int32(0))
  t = time.perf_counter()
  compiled = step_fn.lower(*step_args).compile()
  out["train_compile_s"] = time.perf_counter() - t
  step_flops = _flops(compiled)
  for _ in range(2):  # warm-up
    jax.block_until_ready(train_lib.train_step(state, step_fn, fake)["loss"])
  out["train_gemm_gflops"] = gemm_gflops(gemm_size)
  step_time = _median_time(lambda: train_lib.train_step(state, step_fn, fake)["loss"],
                           max(repeats, 5))
  out.update(train_step_s=step_time, train_frames_per_s=batch * length / step_time,
             train_gflop_per_frame=step_flops / (batch * length) / 1e9,
             train_fraction=step_flops / step_time / 1e9 / out["train_gemm_gflops"])
  if not with_data:
    return out

  # ------------------------------------------------------------------ real input pipeline
  # TensorFlow (tf.data) only here: the rest of this benchmark runs where jax alone is installed.
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top

  out["data_load_split_s"] = data_s
  train_iter = pipeline.train_iterator(train_split.train, config, start_step=0,
                                       process_index=0, process_count=1)
  batches = sharding.prefetch_to_mesh(train_iter, mesh, d.prefetch)
  t = time.perf_counter()
  jax.block_until_ready(train_lib.train_step(state, step_fn, next(batches))["loss"])
  out["data_first_step_s"] = time.perf_counter() - t  # pipeline start-up + one step
  wait = total = 0.0
  for _ in range(data_steps):
    t0 = time.perf_counter()
    b = next(batches)
    t1 = time.perf_counter()
    loss = train_lib.train_step(state, step_fn, b)["loss"]
    jax.block_until_ready(loss)  # the device is idle while the host waits in next()
    wait += t1 - t0
    total += time.perf_counter() - t0
  if not np.isfinite(float(loss)):
    raise RuntimeError(f"non-finite training loss {float(loss)} with real data")
  out.update(data_steps=data_steps, data_step_s=total / data_steps,
             data_wait_fraction=wait / total)

  # ------------------------------------------------------------------ batched extraction
  unique = list(dict.fromkeys(list(split.query) + list(split.gallery)))
  embed_flip = embedding.make_embed_fn(state, mesh, config.eval.flip)
  jax.block_until_ready(embed_flip(state.model_state, frames))  # compile outside the timing
  counts = {"batches": 0, "clips": 0}

  def counted(it):
    for b in it:
      counts["batches"] += 1
      counts["clips"] += int(np.sum(b["mask"]))
      yield b

  def global_embed(f):  # as train.evaluate_tracklets
    return embed_flip(state.model_state, _global({"frames": f}, mesh)["frames"])

  it = pipeline.eval_iterator(unique, config, sampling="all_frames", clips=config.eval.clips)
  t = time.perf_counter()
  feats = pooling.extract_features(global_embed, counted(it), len(unique))
  ext = time.perf_counter() - t
  if feats.shape[0] != len(unique) or not np.all(np.isfinite(feats)):
    raise RuntimeError(f"extraction returned {feats.shape} / non-finite features")
  passes = 2 if config.eval.flip else 1
  model_frames = counts["batches"] * ev * length * passes  # padded rows run too
  out.update(extract_tracklets=len(unique), extract_batches=counts["batches"],
             extract_clips=counts["clips"], extract_s=ext, extract_flip=bool(config.eval.flip),
             extract_frames_per_s=counts["clips"] * length / ext,
             extract_model_frames_per_s=model_frames / ext,
             extract_vs_forward=model_frames / ext / out["forward_frames_per_s"])
  return out


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
  parser.add_argument("--kernels", default="auto", choices=resnet.KERNEL_MODES,
                      help="ResNet kernels: auto (CPU rewrites on XLA:CPU), fast, stock")
  parser.add_argument("--compare-kernels", action="store_true",
                      help="also time each train step with the stock kernels, alternately")
  parser.add_argument("--with-data", action="store_true",
                      help="synthetic main job: real tf.data pipeline wait + batched extraction")
  parser.add_argument("--data-root", default="",
                      help="synthetic benchmark folder (default: configs/synthetic.py's)")
  parser.add_argument("--data-steps", type=int, default=20, help="steps fed by the pipeline")
  parser.add_argument("--no-synthetic", action="store_true",
                      help="skip the synthetic main-job figures")
  args = parser.parse_args(argv)
  resnet.set_kernels(args.kernels)
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
                            "device_count": jax.device_count(), "kernels": args.kernels,
                            "fast_kernels": resnet.use_fast_kernels()}
  for preset in presets:
    config = mars.get_config(preset + (",smoke" if args.smoke else ""))
    if not args.smoke:
      config.data.seq_len = 6
    batch = (config.data.num_ids_per_batch * config.data.num_tracklets_per_id
             if args.paper_batch else 4)
    r = bench_model(config, args.num_classes, batch, args.repeats, args.gemm_size,
                    args.compare_kernels)
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
    if args.compare_kernels:
      print(f"{preset:>10} train step with stock kernels {r['stock_train_step_s']:.2f} s: "
            f"rewrites {r['kernel_speedup']:.2f}x faster (CPU time {r['kernel_speedup_cpu_time']:.2f}x)",
            flush=True)
    for k, v in r.items():
      result[f"{preset}_{k}"] = v
  if not args.no_synthetic:
    r = bench_synthetic(args.repeats, args.gemm_size, args.with_data, args.data_root,
                        args.data_steps, args.smoke)
    gemm = max(gemm, r["forward_gemm_gflops"], r["train_gemm_gflops"])
    line = (f" synthetic {r['config']} {r['batch']} at {r['height']}x{r['width']}: forward "
            f"{r['forward_frames_per_s']:.1f} frames/s at {r['forward_batch']} "
            f"({r['forward_fraction']:.0%} of GEMM) | train step {r['train_step_s']:.3f} s "
            f"({r['train_fraction']:.0%} of GEMM {r['train_gemm_gflops']:.0f}; "
            f"compile {r['train_compile_s']:.1f} s)")
    if args.with_data:
      line += (f" | real data: {r['data_step_s']:.3f} s/step, waiting for data "
               f"{r['data_wait_fraction']:.1%} | extraction {r['extract_tracklets']} tracklets: "
               f"{r['extract_model_frames_per_s']:.1f} model frames/s = "
               f"{r['extract_vs_forward']:.0%} of the forward rate")
    print(line, flush=True)
    for k, v in r.items():
      result[f"synthetic_{k}"] = v
  result["gemm_gflops"] = gemm  # the best rate seen; each fraction uses its own neighbour
  for key in ("stmn_forward_fraction", "stmn_train_fraction"):
    result.setdefault(key, None)  # stable keys when STMN is not in --models
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
