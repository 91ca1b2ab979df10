"""`benchmarks/device_check.py --smoke` runs where TensorFlow, TFDS, clu and TensorBoard are
unimportable (as on the GPU machine) and ends with one JSON line of finite figures."""

from __future__ import annotations

import json
import math

from tests.blocked_imports import BLOCKED, run_blocked

PARTS = ("reference", "bfloat16", "float32", "ranking", "streaming")

_CODE = f"""
import runpy
sys.argv = ["device_check", "--smoke"]
try:
  runpy.run_module("benchmarks.device_check", run_name="__main__")
finally:
  loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
  print("BLOCKED_LOADED", loaded, file=sys.stderr)
"""


def _numbers(x):
  if isinstance(x, bool) or x is None or isinstance(x, str):
    return
  if isinstance(x, (int, float)):
    yield x
  elif isinstance(x, dict):
    for v in x.values():
      yield from _numbers(v)
  elif isinstance(x, list):
    for v in x:
      yield from _numbers(v)


def test_device_check_smoke_without_tensorflow_or_clu():
  proc = run_blocked(_CODE)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "BLOCKED_LOADED []" in proc.stderr
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result["smoke"] is True and result["skipped"] == [] and not result["time_guard_hit"]
  assert result["device"].startswith("cpu") and result["jax_version"]
  assert result["ref_passed"] is True
  for precision in ("highest", "default"):
    assert result[f"ref_{precision}_passed"] is True
    for figure in ("embedding_rel_l2", "grad_rel_l2", "loss_rel_err"):
      assert result[f"ref_{precision}_{figure}"] <= result[f"ref_{precision}_{figure}_tol"]
  assert result["ref_highest_grad_rel_l2_tol"] <= 1e-3  # the smoke size is well conditioned
  expected = [f"{part}_part_s" for part in PARTS] + ["peak_tflops", "total_s"]
  for dtype in ("float32", "bfloat16"):
    expected += [f"train_{dtype}_{k}" for k in (
        "compile_s", "step_s", "frames_per_s", "tflop_per_step", "achieved_tflops", "mfu",
        "loss", "program_bytes", "embed_clips_per_s", "embed_mfu")]
    assert f"train_{dtype}_peak_bytes_in_use" in result  # null on a CPU
  expected += ["ranking_s", "ranking_mAP", "streaming_s", "streaming_gallery_per_s",
               "streaming_mAP"]
  missing = [k for k in expected if result.get(k) is None]
  assert not missing, missing
  assert all(math.isfinite(v) for v in _numbers(result)), result
  assert result["train_float32_step_s"] > 0 and 0 < result["train_float32_mfu"] < 1
  assert result["streaming_size"] == "100x10000x128"
