"""Device check: STMN's numbers against a CPU float64 reference, and its speed, on one accelerator.

  python -m benchmarks.device_check [--smoke] [--steps=10] [--max-seconds=420]
      [--skip=reference,float32,bfloat16,ranking,streaming]
  benchmarks/device_check.sh [args]   # on the GPU machine: installs the carried wheels first

Imports only jax, flax, optax, numpy and ml_collections (through `configs` and the TF-free
core: `train_state`, `embedding`, `models`, `losses`, `sharding`, `ranking`); never TensorFlow
or clu. Runs on one device (`jax.devices()[0]`, a one-device mesh). Parts, in order:
- `reference`: a small STMN (ResNet-50 at width 0.25, 128x64, 4 tracklets x 4 frames; the
  smoke size with `--smoke`) evaluated on the device in float32 and on the CPU in float64 (same
  parameters and inputs, `jax.enable_x64`; the losses compute in float32 by design): eval-mode
  embedding and train-mode loss gradients, compared by relative L2 (`||a - ref|| / ||ref||`,
  over the whole gradient tree, and the worst single parameter), next to the CPU's own float32
  error (the baseline). Done twice on the device: with `jax.default_matmul_precision("highest")`
  (a correctness check: each error <= max(REF_TOL_HIGHEST, REF_TOL_FACTOR x the CPU float32
  error)) and at the default precision that training uses (TF32 on an H100; floor
  REF_TOL_DEFAULT);
- `bfloat16`, `float32` (`config.model.dtype`): the train step of `stmn_jax.train_state` at
  the paper's batch (8 ids x 4 tracklets x 6 frames, 256x128, ResNet-50 STMN, 625 classes,
  random data): compile time, s/step (median of `--steps` after `--warmup` steps), frames/s,
  FLOPs per step (XLA's cost analysis), achieved FLOP/s and MFU = that / the device's dense peak
  (PEAK_FLOPS below; on a CPU: a jitted fp32 GEMM rate measured here), peak device memory
  (`memory_stats()["peak_bytes_in_use"]`, process-wide and never reset, so float32's figure,
  measured second, is a max over both; null where the backend has none) and the step program's own
  memory from `memory_analysis()`; then the eval-mode jitted embed with flip
  (`embedding.make_embed_fn`) at the eval batch (32 clips of 6 frames): clips/s;
- `ranking`: MARS size (1,980 x 11,310, 2,048-d random features, cosine):
  `ranking.pairwise_distance` + `ranking.rank`, median of 3 after one warm-up;
- `streaming`: `ranking.rank_streaming` of the same queries against a 10^6 gallery (the MARS
  gallery then distractors of other ids), generated chunk by chunk on the host.
`--smoke`: all of it at a toy size (ResNet-18 width 0.125, 64x32, 2 ids x 2 tracklets x 2
frames, 100 queries of 128-d, galleries of 10^3 / 10^4) in well under a minute on a CPU, with
XLA's optimisations off (`jax_disable_most_optimizations`: compile time dominates at that size;
the smoke figures only show that every part runs, `xla_optimizations` in the JSON).
`--max-seconds`: a part that would end past that many seconds (by ESTIMATE_S, or the other train
part's measured time) is skipped, and the JSON says so (`skipped`, `time_guard_hit`); with
`--smoke` only parts that would start past it. The last line printed is one JSON object with every figure.
Exit status 1 when the reference check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.model_step import _flops, _median_time, gemm_gflops
from configs import mars
from stmn_jax import embedding, losses, models, ranking, sharding
from stmn_jax import train_state as train_lib

PARTS = ("reference", "bfloat16", "float32", "ranking", "streaming")  # the order they run in
# Seconds a part is expected to take on one H100 (compiles included), for the time guard; a
# train part uses the other dtype's measured time once there is one.
ESTIMATE_S = {"reference": 90.0, "bfloat16": 150.0, "float32": 150.0, "ranking": 20.0,
              "streaming": 60.0}
# Tolerances of the reference check, per figure (REF_CHECKED): max(floor, REF_TOL_FACTOR x the
# CPU's own float32 error at the same size). The device in float32 should be as accurate as the
# CPU in float32: the gradients of a ReLU / max-pool / hard-mining network are not smooth, so
# float32 rounding alone flips a few kinks (at ResNet-50 w0.25, 128x64 the CPU's gradient error
# is ~5e-3, at ResNet-18 w0.125, 64x32 ~3e-6) and a fixed bound would be too tight or too loose.
REF_TOL_HIGHEST = 1e-4  # floor at "highest" matmul precision (true float32)
REF_TOL_DEFAULT = 5e-2  # floor at the default precision (TF32 convolutions on Hopper)
REF_TOL_FACTOR = 4.0
REF_CHECKED = ("embedding_rel_l2", "grad_rel_l2", "loss_rel_err")
NUM_CLASSES = 625  # MARS training ids
# Dense peaks (FLOP/s) by `device_kind` substring: (bfloat16, float32). float32 is the TF32
# tensor-core peak: XLA:GPU runs float32 convolutions and matmuls in TF32 at the default
# precision, which is what the train step uses (plain FP32 CUDA cores: 67e12 on an H100 SXM).
# The H200 has the H100 SXM's compute. TPUs: the bf16 MXU peak for both (float32 matmuls run as
# bf16 passes by default).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("H200", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v6", 918e12, 918e12),
)


def _elapsed(t0: float) -> float:
  return time.perf_counter() - t0


def peak_flops(device: Any, smoke: bool) -> tuple[dict[str, float], str]:
  """{"float32": FLOP/s, "bfloat16": FLOP/s} of `device` and where the figures come from."""
  kind = getattr(device, "device_kind", "")
  if device.platform != "cpu":
    for name, bf16, fp32 in PEAK_FLOPS:
      if name.lower() in kind.lower():
        return {"float32": fp32, "bfloat16": bf16}, f"table: {name} dense bf16 / TF32 peak"
    return {}, f"unknown device_kind {kind!r}: no peak in the table, MFU is null"
  rate = gemm_gflops(512 if smoke else 2048) * 1e9
  return {"float32": rate, "bfloat16": rate}, "measured: jitted fp32 GEMM rate of this CPU"


def paper_config(dtype: str, smoke: bool) -> Any:
  """MARS STMN at the paper's batch (8 x 4 x 6, 256x128, ResNet-50); smoke: 2 x 2 x 2 toy."""
  config = mars.get_config("stmn,smoke" if smoke else "stmn")
  d = config.data
  if smoke:
    d.num_ids_per_batch, d.num_tracklets_per_id, d.seq_len, d.eval_batch_size = 2, 2, 2, 4
  else:
    d.num_ids_per_batch, d.num_tracklets_per_id, d.seq_len, d.eval_batch_size = 8, 4, 6, 32
  config.model.dtype = dtype
  return config


def reference_config(smoke: bool) -> Any:
  """The small STMN of the reference check: 4 tracklets x 4 frames."""
  config = mars.get_config("stmn,smoke")  # ResNet-18 w0.125, 64x32
  if not smoke:
    config.model.depth, config.model.width = 50, 0.25
    config.data.height, config.data.width = 128, 64
  config.data.num_ids_per_batch, config.data.num_tracklets_per_id, config.data.seq_len = 2, 2, 4
  return config


# ------------------------------------------------------------------------------ reference
def _loss_and_embedding_fn(graph_train: Any, graph_eval: Any, config: Any) -> Callable:
  """`(state, frames, pid, key) -> (loss, param grads, eval-mode embedding)`."""

  def fn(state, frames, pid, key):
    model = nnx.merge(graph_train, state)

    def loss_of(m):
      return losses.total_loss(m(frames), {"pid": pid}, config, rng=key)[0]

    loss, grads = nnx.value_and_grad(loss_of)(model)
    emb = nnx.merge(graph_eval, state)(frames)["embedding"]
    return loss, nnx.to_pure_dict(grads), emb

  return fn


def _graphs(config: Any, num_classes: int) -> tuple[Any, Any, Any]:
  """Train / eval graphdefs and the train-mode state of a fresh model."""
  model = models.create_model(config, num_classes, nnx.Rngs(0), load_weights=False)
  model.eval()
  graph_eval = nnx.graphdef(model)
  model.train()
  graph_train, state = nnx.split(model)
  return graph_train, graph_eval, state


def _rel_l2(a: Any, ref: Any) -> float:
  a, ref = np.asarray(a, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
  return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def _errors(result: tuple, ref: tuple) -> dict[str, float]:
  """Relative errors of `(loss, grads, embedding)` against the float64 reference."""
  flat = lambda tree: np.concatenate(
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  g, g_ref = jax.tree.leaves(result[1]), jax.tree.leaves(ref[1])
  # Worst single parameter, among those whose gradient is not ~0 in exact arithmetic (biases
  # before a BatchNorm have a zero gradient: there the relative error is noise over noise).
  floor = 1e-4 * np.linalg.norm(flat(g_ref))
  return {
      "embedding_rel_l2": _rel_l2(result[2], ref[2]),
      "grad_rel_l2": _rel_l2(flat(g), flat(g_ref)),
      "loss_rel_err": abs(float(result[0]) - float(ref[0])) / max(abs(float(ref[0])), 1e-30),
      "grad_worst_param_rel_l2": max(
          _rel_l2(a, r) for a, r in zip(g, g_ref) if np.linalg.norm(r) > floor),
  }


def reference_check(smoke: bool) -> dict[str, Any]:
  """Device float32 vs CPU float64 (and CPU float32 vs float64, the baseline): relative errors
  of the embedding, the loss and the gradient tree, each against its tolerance."""
  config = reference_config(smoke)
  d = config.data
  b = d.num_ids_per_batch * d.num_tracklets_per_id
  num_classes = 4
  rng = np.random.default_rng(0)
  frames = rng.normal(size=(b, d.seq_len, d.height, d.width, 3)).astype(np.float32)
  pid = (np.arange(b) // d.num_tracklets_per_id).astype(np.int32)
  key = jax.random.PRNGKey(0)
  graph_train, graph_eval, state = _graphs(config, num_classes)
  fn = _loss_and_embedding_fn(graph_train, graph_eval, config)
  out: dict[str, Any] = {"ref_model": f"STMN ResNet-{config.model.depth} w{config.model.width} "
                         f"{d.height}x{d.width}, {b}x{d.seq_len} frames"}
  results = {}
  on_cpu = jax.devices()[0].platform == "cpu"
  # XLA:CPU computes float32 the same at every matmul precision: one run serves both there.
  for precision in ("default",) if on_cpu else ("highest", "default"):
    with jax.default_matmul_precision(precision):
      t = time.perf_counter()
      results[precision] = jax.device_get(jax.jit(fn)(state, frames, pid, key))
      out[f"ref_device_{precision}_s"] = _elapsed(t)
  results.setdefault("highest", results["default"])

  cpu = jax.devices("cpu")[0]
  host_state = jax.device_get(state)
  if on_cpu:
    results["cpu_float32"] = results["default"]
  else:
    with jax.default_device(cpu):
      t = time.perf_counter()
      results["cpu_float32"] = jax.device_get(
          jax.jit(fn)(*jax.device_put((host_state, frames, pid, key), cpu)))
      out["ref_cpu_float32_s"] = _elapsed(t)
  cast = lambda x: (np.asarray(x, np.float64) if jnp.issubdtype(x.dtype, jnp.floating)
                    else np.asarray(x))
  t = time.perf_counter()
  with jax.enable_x64(True), jax.default_device(cpu):
    config64 = reference_config(smoke)
    config64.model.dtype = "float64"
    g_train64, g_eval64, state64 = _graphs(config64, num_classes)
    nnx.replace_by_pure_dict(
        state64, jax.device_put(jax.tree.map(cast, nnx.to_pure_dict(host_state)), cpu))
    ref_fn = jax.jit(_loss_and_embedding_fn(g_train64, g_eval64, config64))
    ref = jax.device_get(ref_fn(*jax.device_put((state64, frames.astype(np.float64), pid, key),
                                                cpu)))
  out["ref_cpu_float64_s"] = _elapsed(t)

  base = _errors(results["cpu_float32"], ref)
  for name, e in base.items():
    out[f"ref_cpu_float32_{name}"] = e
  print(f"reference: CPU float32 vs float64 (the baseline): embedding "
        f"{base['embedding_rel_l2']:.2e}, gradients {base['grad_rel_l2']:.2e}, "
        f"loss {base['loss_rel_err']:.2e}", flush=True)
  ok = True
  for precision, floor in (("highest", REF_TOL_HIGHEST), ("default", REF_TOL_DEFAULT)):
    errs = _errors(results[precision], ref)
    tols = {k: max(floor, REF_TOL_FACTOR * base[k]) for k in REF_CHECKED}
    passed = all(math.isfinite(errs[k]) and errs[k] <= tols[k] for k in REF_CHECKED)
    ok &= passed
    for name, e in errs.items():
      out[f"ref_{precision}_{name}"] = e
    for name, tol in tols.items():
      out[f"ref_{precision}_{name}_tol"] = tol
    out[f"ref_{precision}_passed"] = passed
    print(f"reference: device float32, {precision} precision vs float64: embedding "
          f"{errs['embedding_rel_l2']:.2e} (tolerance {tols['embedding_rel_l2']:.1e}), gradients "
          f"{errs['grad_rel_l2']:.2e} ({tols['grad_rel_l2']:.1e}; worst parameter "
          f"{errs['grad_worst_param_rel_l2']:.2e}), loss {errs['loss_rel_err']:.2e} "
          f"({tols['loss_rel_err']:.1e}) -> {'PASS' if passed else 'FAIL'}", flush=True)
  out["ref_passed"] = ok
  return out


# ------------------------------------------------------------------------------ train step
def _device_peak_bytes(device: Any) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without stats raise)
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _program_bytes(compiled: Any) -> int | None:
  """Arguments + outputs (less donated aliases) + temporaries of a compiled program."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def bench_train(dtype: str, smoke: bool, steps: int, warmup: int, peak: float | None,
                device: Any) -> dict[str, Any]:
  """Train step at the paper's batch, then the flip embed at the eval batch, in `dtype`."""
  config = paper_config(dtype, smoke)
  d = config.data
  mesh = sharding.make_mesh(1)
  batch, length = d.num_ids_per_batch * d.num_tracklets_per_id, d.seq_len
  frames_n = batch * length
  state, lr_fn = train_lib.create_train_state(config, NUM_CLASSES, 100, mesh)
  step_fn = train_lib.make_train_step(state, config, mesh, lr_fn)
  rng = np.random.default_rng(0)
  data = sharding.global_batch({
      "frames": rng.normal(size=(batch, length, d.height, d.width, 3)).astype(np.float32),
      "pid": (np.arange(batch) // d.num_tracklets_per_id).astype(np.int32),
      "camid": np.zeros(batch, np.int32)}, mesh)
  t = time.perf_counter()
  compiled = step_fn.lower(state.model_state, state.opt_state, data, state.rng,
                           jnp.int32(0)).compile()
  compile_s = _elapsed(t)
  flops = _flops(compiled)
  for _ in range(warmup):
    jax.block_until_ready(train_lib.train_step(state, step_fn, data)["loss"])
  step_s = _median_time(lambda: train_lib.train_step(state, step_fn, data)["loss"], steps)
  loss = float(train_lib.train_step(state, step_fn, data)["loss"])
  if not math.isfinite(loss):
    raise RuntimeError(f"{dtype} train step: non-finite loss {loss}")
  achieved = flops / step_s
  out = {
      "batch": f"{d.num_ids_per_batch}x{d.num_tracklets_per_id}x{length}",
      "image": f"{d.height}x{d.width}", "backbone": f"resnet{config.model.depth}",
      "compile_s": compile_s, "step_s": step_s, "frames_per_s": frames_n / step_s,
      "tflop_per_step": flops / 1e12, "achieved_tflops": achieved / 1e12,
      "mfu": achieved / peak if peak else None, "loss": loss,
      "program_bytes": _program_bytes(compiled),
      "peak_bytes_in_use": _device_peak_bytes(device),
  }
  print(f"train step {dtype} {out['batch']} at {out['image']}: {step_s * 1e3:.1f} ms/step, "
        f"{out['frames_per_s']:.1f} frames/s, {out['tflop_per_step']:.3f} TFLOP/step, "
        f"MFU {out['mfu'] if out['mfu'] is None else format(out['mfu'], '.1%')}, "
        f"compile {compile_s:.1f} s", flush=True)

  ev = d.eval_batch_size
  embed = embedding.make_embed_fn(state, mesh, flip=True)
  clips = sharding.global_batch(
      {"frames": rng.normal(size=(ev, length, d.height, d.width, 3)).astype(np.float32)},
      mesh)["frames"]
  t = time.perf_counter()
  embed_c = embed.lower(state.model_state, clips).compile()
  out["embed_compile_s"] = _elapsed(t)
  emb_flops = _flops(embed_c)
  for _ in range(warmup):
    jax.block_until_ready(embed_c(state.model_state, clips))
  embed_s = _median_time(lambda: embed_c(state.model_state, clips), steps)
  out.update(embed_batch=f"{ev}x{length}", embed_s=embed_s, embed_clips_per_s=ev / embed_s,
             embed_frames_per_s=ev * length * 2 / embed_s,
             embed_mfu=emb_flops / embed_s / peak if peak else None)
  print(f"embed {dtype} with flip, {ev} clips x {length} frames: {ev / embed_s:.1f} clips/s",
        flush=True)
  return out


# ------------------------------------------------------------------------------ ranking
def _ids(n: int, num_ids: int, cams: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
  i = np.arange(n)
  return (i % num_ids).astype(np.int64), ((i // num_ids + offset) % cams).astype(np.int64)


def ranking_sizes(smoke: bool) -> dict[str, int]:
  if smoke:
    return dict(num_q=100, num_g=1000, dim=128, num_ids=50, stream_g=10_000, chunk=2048)
  return dict(num_q=1980, num_g=11310, dim=2048, num_ids=626, stream_g=1_000_000, chunk=65536)


def bench_ranking(smoke: bool) -> dict[str, Any]:
  """MARS-size exact ranking: pairwise_distance + rank (cosine)."""
  s = ranking_sizes(smoke)
  rng = np.random.default_rng(1)
  q = rng.standard_normal((s["num_q"], s["dim"]), np.float32)
  g = rng.standard_normal((s["num_g"], s["dim"]), np.float32)
  qp, qc = _ids(s["num_q"], s["num_ids"], 6, 0)
  gp, gc = _ids(s["num_g"], s["num_ids"], 6, 1)

  def run():
    return ranking.rank(ranking.pairwise_distance(q, g, "cosine"), qp, gp, qc, gc)

  t = time.perf_counter()
  res = run()
  first = _elapsed(t)
  rank_s = _median_time(run, 3)
  print(f"ranking {s['num_q']} x {s['num_g']} x {s['dim']}: {rank_s:.3f} s "
        f"(first call {first:.1f} s), mAP {res['mAP']:.4f}", flush=True)
  return {"size": f"{s['num_q']}x{s['num_g']}x{s['dim']}", "first_s": first, "s": rank_s,
          "mAP": float(res["mAP"])}


def bench_streaming(smoke: bool) -> dict[str, Any]:
  """rank_streaming of the MARS-size queries against a generated gallery of stream_g rows:
  the MARS-size gallery first, then distractors (ids no query has), chunk by chunk. The
  features are one random block rolled differently per chunk (cheap to make; rows repeat
  across chunks, and equal distances rank by gallery index, as in `rank`)."""
  s = ranking_sizes(smoke)
  rng = np.random.default_rng(1)
  q = rng.standard_normal((s["num_q"], s["dim"]), np.float32)
  qp, qc = _ids(s["num_q"], s["num_ids"], 6, 0)
  chunk, total = s["chunk"], s["stream_g"]
  base = rng.standard_normal((chunk, s["dim"]), np.float32)  # rolled per chunk: cheap to make

  def chunks():
    for start in range(0, total, chunk):
      n = min(chunk, total - start)
      feats = np.roll(base, start // chunk * 7919, axis=0)[:n]
      i = np.arange(start, start + n)
      gp = np.where(i < s["num_g"], i % s["num_ids"], s["num_ids"] + i % 100_000)
      gc = (i // s["num_ids"] + 1) % 6
      yield feats, gp.astype(np.int64), gc.astype(np.int64)

  t = time.perf_counter()
  res = ranking.rank_streaming(q, qp, qc, chunks, metric="cosine")
  stream_s = _elapsed(t)
  print(f"streamed ranking {s['num_q']} x {res['num_gallery']} x {s['dim']}: {stream_s:.2f} s "
        f"(compile included), mAP {res['mAP']:.4f}", flush=True)
  return {"size": f"{s['num_q']}x{res['num_gallery']}x{s['dim']}", "s": stream_s,
          "gallery_per_s": res["num_gallery"] / stream_s, "mAP": float(res["mAP"])}


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="toy sizes (a CPU check)")
  parser.add_argument("--steps", type=int, default=0,
                      help="timed train steps / embed calls (median; default 10, smoke 2)")
  parser.add_argument("--warmup", type=int, default=0, help="untimed calls first (default 2)")
  parser.add_argument("--max-seconds", type=float, default=420.0,
                      help="skip the parts that would end after this many seconds")
  parser.add_argument("--skip", default="", help=f"comma-separated parts of {','.join(PARTS)}")
  args = parser.parse_args(argv)
  skip = {p.strip() for p in args.skip.split(",") if p.strip()}
  if skip - set(PARTS):
    parser.error(f"--skip: unknown parts {sorted(skip - set(PARTS))}; expected {PARTS}")
  steps = args.steps or (2 if args.smoke else 10)
  warmup = args.warmup or (1 if args.smoke else 2)
  t0 = time.perf_counter()
  if args.smoke:  # toy sizes: compile time dominates, and the figures only show that it runs
    jax.config.update("jax_disable_most_optimizations", True)
  device = jax.devices()[0]
  result: dict[str, Any] = {
      "device": f"{device.platform}: {getattr(device, 'device_kind', '')}",
      "device_count": jax.device_count(), "jax_version": jax.__version__,
      "python": platform.python_version(), "smoke": args.smoke, "steps": steps,
      "warmup": warmup, "xla_optimizations": not args.smoke, "skipped": [],
      "time_guard_hit": False}
  print(f"device check on {result['device']} (jax {jax.__version__}, "
        f"{jax.device_count()} device(s); one used)", flush=True)
  peaks, peak_source = peak_flops(device, args.smoke)
  result["peak_tflops"] = {k: v / 1e12 for k, v in peaks.items()} or None
  result["peak_source"] = peak_source

  runners: dict[str, Callable[[], dict[str, Any]]] = {
      "reference": lambda: reference_check(args.smoke),
      "float32": lambda: bench_train("float32", args.smoke, steps, warmup,
                                     peaks.get("float32"), device),
      "bfloat16": lambda: bench_train("bfloat16", args.smoke, steps, warmup,
                                      peaks.get("bfloat16"), device),
      "ranking": lambda: bench_ranking(args.smoke),
      "streaming": lambda: bench_streaming(args.smoke),
  }
  prefixes = {"reference": "", "float32": "train_float32_", "bfloat16": "train_bfloat16_",
              "ranking": "ranking_", "streaming": "streaming_"}
  estimates = dict(ESTIMATE_S)
  for part in PARTS:
    if part in skip:
      result["skipped"].append(f"{part} (--skip)")
      continue
    estimate = 0.0 if args.smoke else estimates[part]
    if _elapsed(t0) + estimate > args.max_seconds:
      result["skipped"].append(f"{part} (time guard: {_elapsed(t0):.0f} s + about {estimate:.0f}"
                               f" s > --max-seconds={args.max_seconds:g})")
      result["time_guard_hit"] = True
      print(f"skipping {part}: past --max-seconds", flush=True)
      continue
    t = time.perf_counter()
    for k, v in runners[part]().items():
      result[prefixes[part] + k] = v
    result[f"{part}_part_s"] = _elapsed(t)
    if part in ("bfloat16", "float32"):
      estimates["bfloat16"] = estimates["float32"] = result[f"{part}_part_s"]
  result.setdefault("ref_passed", None)
  result["total_s"] = _elapsed(t0)
  print(json.dumps(result))
  return 1 if result["ref_passed"] is False else 0


if __name__ == "__main__":
  raise SystemExit(main())
